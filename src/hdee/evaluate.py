"""`hdee evaluate`: test perplexity of every configuration, domain and ensembling method.

Each expert runs once per (domain, split): its label log-probabilities are cached as
safetensors at `RunLayout.label_logprobs(job_id, domain, split)`, and every configuration and
method is computed from that cache. Experts shared by several configurations (the same job id)
are therefore never re-run, and a second `hdee evaluate` only re-mixes.

The cached prior is estimated on validation windows only (the public reference estimated it on
the test windows it then scored). Output schema: docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from hdee.atomic import atomic_path, read_json, write_json, write_text
from hdee.config import ExperimentConfig, load_config
from hdee.data.loaders import eval_batches, eval_windows
from hdee.data.tokens import load_tokens
from hdee.ensemble import (
    estimate_cached_prior,
    label_log_probs,
    mean_posterior,
    mixture_log_probs,
    perplexity,
    posterior_weights,
    simple_average,
)
from hdee.layout import RunLayout
from hdee.model import load_model

RESULTS_FORMAT = "hdee-evaluation"
RESULTS_VERSION = 1
CACHE_FORMAT = "hdee-label-logprobs"
CACHE_VERSION = "1"
CSV_COLUMNS = (
    "configuration",
    "iteration",
    "domain",
    "domain_kind",
    "method",
    "expert",
    "job_id",
    "perplexity",
    "tokens",
    "posterior",
)


# ----------------------------------------------------------------------------------------------
# Which ensembles and which (expert, domain, split) log-probs are needed


def _lanes(plan: dict[str, Any], ensemble: dict[str, str]) -> list[str]:
    """The ensemble's lanes in the plan's lane order (stable expert order in every table)."""
    ordered = [lane for lane in plan.get("lanes", []) if lane in ensemble]
    return ordered + [lane for lane in ensemble if lane not in ordered]


def selected_ensembles(
    plan: dict[str, Any], every_iteration: bool
) -> list[tuple[str, int, dict[str, str]]]:
    """(configuration, 1-based iteration, {lane: job_id}) of every ensemble to evaluate."""
    chosen = []
    for name, configuration in plan["configurations"].items():
        ensembles = configuration["ensembles"]
        if not ensembles:
            raise ValueError(f"plan.json: configuration {name!r} has no ensembles")
        first = 0 if every_iteration else len(ensembles) - 1
        for index in range(first, len(ensembles)):
            ensemble = ensembles[index]
            chosen.append(
                (name, index + 1, {lane: ensemble[lane] for lane in _lanes(plan, ensemble)})
            )
    return chosen


def evaluation_domains(plan: dict[str, Any]) -> dict[str, str]:
    """Domain -> "trained" | "held_out", trained first, each once."""
    kinds: dict[str, str] = {}
    for domain in plan.get("trained_domains", []):
        kinds.setdefault(domain, "trained")
    for domain in plan.get("held_out_domains", []):
        kinds.setdefault(domain, "held_out")
    if not kinds:
        raise ValueError("plan.json lists no trained_domains or held_out_domains to evaluate")
    return kinds


# ----------------------------------------------------------------------------------------------
# The label log-prob cache


def _windows_fingerprint(tokens: np.ndarray, seq_len: int, count: int) -> str:
    """Hash of exactly the tokens the windows read, so a re-prepared split is never mistaken
    for the cached one (cheap: a few MB even for 1000 windows of 1024 tokens)."""
    used = np.ascontiguousarray(tokens[: count * seq_len + 1])
    return hashlib.sha256(used.dtype.str.encode() + used.tobytes()).hexdigest()[:32]


def _cache_metadata(
    job_id: str, domain: str, split: str, seq_len: int, count: int, fingerprint: str
) -> dict[str, str]:
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "job_id": job_id,
        "domain": domain,
        "split": split,
        "seq_len": str(seq_len),
        "num_windows": str(count),
        "tokens_sha256": fingerprint,
    }


def read_cached_log_probs(path: Path, expected: dict[str, str]) -> torch.Tensor | None:
    """The cached `[num_windows, seq_len]` tensor, or None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata() != expected:
                return None
            tensor = handle.get_tensor("log_probs")
    except Exception:  # a corrupt cache file is recomputed, never trusted
        return None
    shape = (int(expected["num_windows"]), int(expected["seq_len"]))
    return tensor if tuple(tensor.shape) == shape else None


def write_cached_log_probs(path: Path, log_probs: torch.Tensor, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({"log_probs": log_probs.float().contiguous()}, str(tmp), metadata=metadata)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_expert(model_dir: Path, device: torch.device) -> LlamaForCausalLM:
    """An expert from its HF directory (safetensors only: never unpickle a checkpoint)."""
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no expert model here (has its job finished?)")
    return load_model(model_dir, device=device).eval()


def compute_log_probs(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_windows: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Label log-probs of every evaluation window, float32 `[num_windows, seq_len]` on CPU."""
    rows = []
    # bf16 autocast on CUDA (as in training); full precision on CPU, where bf16 is slower.
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with autocast:
        for batch in eval_batches(tokens, seq_len, batch_size, max_windows):
            rows.append(label_log_probs(model, batch).cpu())
    return torch.cat(rows)


class _LogProbCache:
    """Label log-probs per (job, domain, split): from disk when present, else computed with
    each expert loaded once for all of its missing (domain, split) pairs."""

    def __init__(self, layout: RunLayout, config: ExperimentConfig, device: torch.device):
        self.layout = layout
        self.config = config
        self.device = device
        self.seq_len = config.data.seq_len
        self._tokens: dict[tuple[str, str], tuple[np.ndarray, int, str]] = {}
        self._loaded: dict[tuple[str, str, str], torch.Tensor] = {}

    def max_windows(self, split: str) -> int | None:
        if split == "validation":
            return self.config.evaluation.cached_prior_sequences
        return self.config.evaluation.max_test_sequences

    def windows(self, domain: str, split: str) -> tuple[np.ndarray, int, str]:
        """(tokens, window count, fingerprint) of a domain's split, read once."""
        key = (domain, split)
        if key not in self._tokens:
            tokens = load_tokens(self.layout.tokens(domain, split))
            count = eval_windows(tokens, self.seq_len, self.max_windows(split))
            self._tokens[key] = (tokens, count, _windows_fingerprint(tokens, self.seq_len, count))
        return self._tokens[key]

    def metadata(self, job_id: str, domain: str, split: str) -> dict[str, str]:
        _, count, fingerprint = self.windows(domain, split)
        return _cache_metadata(job_id, domain, split, self.seq_len, count, fingerprint)

    def get(self, job_id: str, domain: str, split: str) -> torch.Tensor:
        key = (job_id, domain, split)
        if key not in self._loaded:  # shared experts appear in several configurations
            path = self.layout.label_logprobs(job_id, domain, split)
            cached = read_cached_log_probs(path, self.metadata(job_id, domain, split))
            if cached is None:
                raise RuntimeError(f"label log-probs of {job_id} on {domain}/{split} missing")
            self._loaded[key] = cached
        return self._loaded[key]

    def fill(self, needed: list[tuple[str, str, str]], progress: Progress | None) -> None:
        """Compute every missing (job, domain, split), grouped by job so each model loads once."""
        missing: dict[str, list[tuple[str, str]]] = {}
        for job_id, domain, split in needed:
            path = self.layout.label_logprobs(job_id, domain, split)
            if read_cached_log_probs(path, self.metadata(job_id, domain, split)) is None:
                missing.setdefault(job_id, []).append((domain, split))
        total = sum(self.windows(d, s)[1] for pairs in missing.values() for d, s in pairs)
        task = progress.add_task("label log-probs", total=total) if progress else None
        batch_size = self.config.evaluation.batch_size
        for job_id, pairs in missing.items():
            model = load_expert(self.layout.job(job_id) / "final", self.device)
            for domain, split in pairs:
                tokens, count, _ = self.windows(domain, split)
                if progress is not None and task is not None:
                    progress.update(task, description=f"{job_id} {domain}/{split}")
                log_probs = compute_log_probs(
                    model, tokens, self.seq_len, batch_size, self.max_windows(split), self.device
                )
                write_cached_log_probs(
                    self.layout.label_logprobs(job_id, domain, split),
                    log_probs,
                    self.metadata(job_id, domain, split),
                )
                if progress is not None and task is not None:
                    progress.advance(task, count)
            del model
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Mixing one ensemble on one domain


def _score(log_probs: torch.Tensor) -> dict[str, Any]:
    return {"perplexity": perplexity(log_probs), "tokens": int(log_probs.numel())}


def evaluate_ensemble_on_domain(
    test_lp: torch.Tensor,
    validation_lp: torch.Tensor | None,
    lanes: list[str],
    job_ids: list[str],
    methods: list[str],
    posterior: str,
    decay: float,
) -> dict[str, Any]:
    """All methods for one ensemble on one domain, from label log-probs `[E, N, T]`."""
    result: dict[str, Any] = {"methods": {}, "mean_posterior": {}}
    methods_out = result["methods"]
    if "simple_average" in methods:
        methods_out["simple_average"] = _score(simple_average(test_lp))
    if "uniform_prior" in methods:
        methods_out["uniform_prior"] = _score(mixture_log_probs(test_lp, None, posterior))
        weights = mean_posterior(posterior_weights(test_lp, None, posterior))
        result["mean_posterior"]["uniform_prior"] = dict(zip(lanes, weights.tolist(), strict=True))
    if "cached_prior" in methods:
        assert validation_lp is not None
        # Sequence log-likelihood of each validation window under each expert: [N_val, E].
        sequence_ll = validation_lp.to(torch.float64).sum(dim=2).T
        prior = estimate_cached_prior(sequence_ll, decay)
        log_prior = prior.log()
        methods_out["cached_prior"] = _score(mixture_log_probs(test_lp, log_prior, posterior))
        weights = mean_posterior(posterior_weights(test_lp, log_prior, posterior))
        result["mean_posterior"]["cached_prior"] = dict(zip(lanes, weights.tolist(), strict=True))
        result["cached_prior"] = dict(zip(lanes, prior.tolist(), strict=True))
        result["cached_prior_sequences"] = int(validation_lp.shape[1])
    if "single_experts" in methods:
        singles = {
            lane: {**_score(test_lp[j]), "job_id": job_id}
            for j, (lane, job_id) in enumerate(zip(lanes, job_ids, strict=True))
        }
        result["single_experts"] = singles
        best_lane = min(singles, key=lambda lane: singles[lane]["perplexity"])
        methods_out["best_single"] = {**singles[best_lane], "expert": best_lane}
    return result


# ----------------------------------------------------------------------------------------------
# The run


def evaluate_run(
    run_dir: str | Path, config: ExperimentConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Evaluate every configuration in `RUN/plan.json`; write and return the results.

    Writes `RUN/evaluation/results.json` and `results.csv` (schema: docs/evaluation.md).
    """
    layout = RunLayout.of(run_dir)
    if config is None:
        config = load_config(layout.config)
    if not layout.plan.is_file():
        raise FileNotFoundError(f"{layout.plan}: no plan yet (run the plan stage first)")
    plan = read_json(layout.plan)
    settings = config.evaluation
    methods = list(dict.fromkeys(settings.methods))
    domains = evaluation_domains(plan)
    ensembles = selected_ensembles(plan, settings.every_iteration)
    splits = ["test"] + (["validation"] if "cached_prior" in methods else [])
    device = pick_device()
    cache = _LogProbCache(layout, config, device)

    # Every (job, domain, split) any selected ensemble needs, each once, in a stable order.
    needed = list(
        dict.fromkeys(
            (job_id, domain, split)
            for _, _, ensemble in ensembles
            for job_id in ensemble.values()
            for domain in domains
            for split in splits
        )
    )
    with _progress(progress) as bar:
        cache.fill(needed, bar)

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "posterior": settings.posterior,
        "methods": methods,
        "seq_len": config.data.seq_len,
        "cached_prior_decay": settings.cached_prior_decay,
        "device": str(device),
        "domains": {},
        "configurations": {},
    }
    for domain, kind in domains.items():
        entry: dict[str, Any] = {"kind": kind, "test_windows": cache.windows(domain, "test")[1]}
        if "validation" in splits:
            entry["validation_windows"] = cache.windows(domain, "validation")[1]
        results["domains"][domain] = entry

    for name, iteration, ensemble in ensembles:
        lanes, job_ids = list(ensemble), list(ensemble.values())
        configuration = results["configurations"].setdefault(
            name,
            {"final_iteration": len(plan["configurations"][name]["ensembles"]), "iterations": {}},
        )
        per_domain: dict[str, Any] = {}
        for domain in domains:
            test_lp = torch.stack([cache.get(job, domain, "test") for job in job_ids])
            validation_lp = (
                torch.stack([cache.get(job, domain, "validation") for job in job_ids])
                if "validation" in splits
                else None
            )
            per_domain[domain] = evaluate_ensemble_on_domain(
                test_lp,
                validation_lp,
                lanes,
                job_ids,
                methods,
                settings.posterior,
                settings.cached_prior_decay,
            )
        configuration["iterations"][str(iteration)] = {"experts": ensemble, "domains": per_domain}

    write_json(layout.evaluation / "results.json", results)
    write_text(layout.evaluation / "results.csv", results_csv(results))
    return results


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("windows"),
        TimeElapsedColumn(),
    ) as bar:
        yield bar


def results_rows(results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One tidy row per configuration / iteration / domain / method (single experts: one row
    per expert, `expert` naming its lane)."""
    posterior = results["posterior"]
    for name, configuration in results["configurations"].items():
        for iteration, entry in configuration["iterations"].items():
            for domain, scores in entry["domains"].items():
                kind = results["domains"][domain]["kind"]
                base = {
                    "configuration": name,
                    "iteration": int(iteration),
                    "domain": domain,
                    "domain_kind": kind,
                }
                for method, score in scores["methods"].items():
                    uses_posterior = method in ("uniform_prior", "cached_prior")
                    yield {
                        **base,
                        "method": method,
                        "expert": score.get("expert", ""),
                        "job_id": score.get("job_id", ""),
                        "perplexity": score["perplexity"],
                        "tokens": score["tokens"],
                        "posterior": posterior if uses_posterior else "",
                    }
                for lane, score in scores.get("single_experts", {}).items():
                    yield {
                        **base,
                        "method": "single_expert",
                        "expert": lane,
                        "job_id": score["job_id"],
                        "perplexity": score["perplexity"],
                        "tokens": score["tokens"],
                        "posterior": "",
                    }


def results_csv(results: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in results_rows(results):
        row = dict(row)
        if isinstance(row["perplexity"], float) and math.isfinite(row["perplexity"]):
            row["perplexity"] = f"{row['perplexity']:.8g}"
        writer.writerow(row)
    return buffer.getvalue()
