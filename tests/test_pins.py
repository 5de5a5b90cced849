"""Pins of behaviour that a refactor must keep, each checked against an independent computation.

- `hdee evaluate` scores the cached_prior method with the prior it estimated on validation text
  (not a uniform prior), and uses `evaluation.posterior` (prefix or updating) for both
  posterior methods.
- `hdee generate` samples when given a temperature (it is not always greedy), reproducibly.
- The learning-rate schedule, value by value: warmup reaches the peak exactly at its last step,
  nothing ever exceeds the peak, the last step is exactly min_lr.

The evaluation pins read the shared run `tiny_cli_run` (conftest.py) through the CLI and recompute
every ensemble perplexity from the experts themselves with the public `hdee.ensemble` functions.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from hdee.atomic import read_json
from hdee.cli import main
from hdee.config import TrainingConfig
from hdee.ensemble import estimate_cached_prior, mixture_log_probs, perplexity
from hdee.train import lr_at


def direct_label_log_probs(
    run_dir: Path, job_id: str, domain: str, split: str, windows: int, seq_len: int
) -> torch.Tensor:
    """`[windows, seq_len]` label log-probs of one expert on the first `windows` windows of a
    domain's split, computed here from the model and token files (the one place this module
    touches the run directory's layout and the evaluator's window convention)."""
    from hdee.data.loaders import eval_batches
    from hdee.data.tokens import load_tokens
    from hdee.layout import RunLayout
    from hdee.model import load_model
    from hdee.scoring import label_log_probs

    layout = RunLayout.of(run_dir)
    model = load_model(layout.job(job_id).final, device=torch.device("cpu")).eval()
    tokens = load_tokens(layout.tokens(domain, split))
    rows = [label_log_probs(model, batch) for batch in eval_batches(tokens, seq_len, 4, windows)]
    return torch.cat(rows)


def hdee_out(*argv: str) -> str:
    """Run `hdee ARGV...` in this process; its stdout (the exit status must be 0)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    assert code == 0, f"hdee {' '.join(argv)} exited {code}: {err.getvalue()}"
    return out.getvalue()


def final_entries(results: dict[str, Any]) -> list[tuple[str, dict[str, str], str, dict]]:
    """(configuration, {lane: job}, domain, scores) of every final ensemble and domain."""
    entries = []
    for name, configuration in results["configurations"].items():
        final = configuration["iterations"][str(configuration["final_iteration"])]
        for domain, scores in final["domains"].items():
            entries.append((name, final["experts"], domain, scores))
    return entries


class Expected:
    """Label log-probs of every (job, domain, split), computed once per test."""

    def __init__(self, run_dir: Path, results: dict[str, Any]):
        self.run_dir, self.results = run_dir, results
        self._cache: dict[tuple[str, str, str], torch.Tensor] = {}

    def lp(self, jobs: list[str], domain: str, split: str) -> torch.Tensor:
        windows = self.results["domains"][domain][f"{split}_windows"]
        for job in jobs:
            if (job, domain, split) not in self._cache:
                self._cache[job, domain, split] = direct_label_log_probs(
                    self.run_dir, job, domain, split, windows, self.results["seq_len"]
                )
        return torch.stack([self._cache[job, domain, split] for job in jobs])

    def cached_prior(self, jobs: list[str], domain: str) -> torch.Tensor:
        validation = self.lp(jobs, domain, "validation").to(torch.float64)
        sequence_ll = validation.sum(dim=2).T  # [windows, experts]
        return estimate_cached_prior(sequence_ll, self.results["cached_prior_decay"])


def test_cached_prior_method_uses_the_cached_prior(tiny_cli_run):
    run_dir = tiny_cli_run["run_dir"]
    results = read_json(run_dir / "evaluation" / "results.json")
    assert results["posterior"] == "prefix"
    expected = Expected(run_dir, results)
    prior_matters = 0
    for name, experts, domain, scores in final_entries(results):
        jobs = list(experts.values())
        prior = expected.cached_prior(jobs, domain)
        where = f"{name} on {domain}"
        recorded = [scores["cached_prior"][lane] for lane in experts]
        assert recorded == pytest.approx(prior.tolist(), abs=1e-6), where
        test_lp = expected.lp(jobs, domain, "test")
        with_prior = perplexity(mixture_log_probs(test_lp, prior.log(), "prefix"))
        uniform = perplexity(mixture_log_probs(test_lp, None, "prefix"))
        assert scores["methods"]["cached_prior"]["perplexity"] == pytest.approx(
            with_prior, rel=1e-4
        ), where
        assert scores["methods"]["uniform_prior"]["perplexity"] == pytest.approx(
            uniform, rel=1e-4
        ), where
        prior_matters += abs(with_prior - uniform) > 1e-3 * uniform
    # Otherwise a uniform prior in place of the cached one would go unnoticed.
    assert prior_matters >= 3, "the cached prior barely changes any perplexity here"


def test_evaluate_uses_the_configured_posterior(tiny_cli_run, tmp_path: Path):
    prefix_results = read_json(tiny_cli_run["run_dir"] / "evaluation" / "results.json")
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_cli_run["run_dir"], run_dir)  # the shared run stays as it is
    hdee_out("evaluate", str(run_dir), "--set", "evaluation.posterior=updating", "--quiet")
    results = read_json(run_dir / "evaluation" / "results.json")
    assert results["posterior"] == "updating"
    expected = Expected(run_dir, results)
    prefix_scores = {(n, d): s for n, _, d, s in final_entries(prefix_results)}
    differs = 0
    for name, experts, domain, scores in final_entries(results):
        jobs = list(experts.values())
        where = f"{name} on {domain}"
        test_lp = expected.lp(jobs, domain, "test")
        log_prior = expected.cached_prior(jobs, domain).log()
        for method, prior in (("uniform_prior", None), ("cached_prior", log_prior)):
            want = perplexity(mixture_log_probs(test_lp, prior, "updating"))
            got = scores["methods"][method]["perplexity"]
            assert got == pytest.approx(want, rel=1e-4), f"{method}, {where}"
            differs += got != pytest.approx(
                prefix_scores[name, domain]["methods"][method]["perplexity"], rel=1e-3
            )
        # Methods without a posterior do not depend on the setting.
        for method in ("simple_average", "best_single"):
            assert scores["methods"][method] == prefix_scores[name, domain]["methods"][method]
    assert differs >= 3, "prefix and updating posteriors give the same numbers here"


def test_generate_samples_when_given_a_temperature(tiny_cli_run):
    run = str(tiny_cli_run["run_dir"])
    base = ["generate", run, "--configuration", "MHe-IHo", "--prompt", "the one"]
    base += ["--max-new-tokens", "12"]
    greedy = hdee_out(*base)
    assert hdee_out(*base, "--temperature", "0") == greedy
    sampled = [hdee_out(*base, "--temperature", "1.5", "--seed", str(seed)) for seed in range(4)]
    # Seeded: the same seed gives the same text.
    assert hdee_out(*base, "--temperature", "1.5", "--seed", "0") == sampled[0]
    # Sampling: different seeds give different texts, and not the greedy one.
    assert len(set(sampled)) >= 2, sampled
    assert any(text != greedy for text in sampled), (greedy, sampled)


def test_lr_schedule_value_by_value():
    tc = TrainingConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=3)
    root3 = math.sqrt(3)
    # Warmup: lr * (step + 1) / warmup, so its last step (2) is the peak; then cosine from the
    # peak at step 3 to min_lr at step 9 over 6 intervals: min + (lr - min) (1 + cos(pi k/6)) / 2.
    expected = [
        1 / 3,
        2 / 3,
        1.0,
        1.0,
        0.1 + 0.45 * (1 + root3 / 2),
        0.1 + 0.45 * 1.5,
        0.1 + 0.45,
        0.1 + 0.45 * 0.5,
        0.1 + 0.45 * (1 - root3 / 2),
        0.1,
    ]
    assert [lr_at(step, tc) for step in range(10)] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "steps, warmup", [(10, 3), (100, 10), (12, 2), (5, 0), (4, 4), (3, 7), (1, 1), (2, 1)]
)
def test_lr_never_exceeds_the_peak_and_ends_at_min_lr(steps: int, warmup: int):
    tc = TrainingConfig(steps=steps, lr=1e-3, min_lr=1e-4, warmup_steps=warmup)
    lrs = [lr_at(step, tc) for step in range(steps)]
    assert max(lrs) <= tc.lr  # exactly, not approximately: no warmup overshoot
    assert min(lrs) > 0
    effective_warmup = min(warmup, steps)
    if effective_warmup:
        assert lrs[effective_warmup - 1] == pytest.approx(tc.lr)  # the peak ends the warmup
        assert lrs[:effective_warmup] == sorted(lrs[:effective_warmup])
    if steps - 1 > effective_warmup:
        assert lrs[-1] == pytest.approx(tc.min_lr)  # decay reaches min_lr at the last step
        assert lrs[effective_warmup] == pytest.approx(tc.lr)  # and starts from the peak
        tail = lrs[effective_warmup:]
        assert tail == sorted(tail, reverse=True)


def test_training_logs_the_scheduled_lr(tiny_cli_run):
    # The loop applies the schedule it logs: every logged lr is lr_at of that step.
    jobs = sorted((tiny_cli_run["run_dir"] / "jobs").glob("*/spec.json"))
    assert jobs
    for spec_path in jobs:
        spec = read_json(spec_path)
        tc = TrainingConfig(**spec["training"])
        metrics = spec_path.parent / "metrics.jsonl"
        rows = [read_json_line(line) for line in metrics.read_text().splitlines()]
        logged = [(row["step"], row["lr"]) for row in rows if "lr" in row]
        assert logged, spec_path
        for done, lr in logged:
            assert lr == pytest.approx(lr_at(done - 1, tc), rel=1e-12), (spec_path, done)
            assert lr <= tc.lr


def read_json_line(line: str) -> dict[str, Any]:
    import json

    return json.loads(line)
