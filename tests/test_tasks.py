"""`hdee tasks`: lm-evaluation-harness, for real, on a tiny run's ensembles and experts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from hdee.cli import main
from hdee.config import load_config
from hdee.ensemble_spec import EnsembleSpec
from hdee.inference import build_ensemble, resolve_ensemble
from hdee.layout import RunLayout
from hdee.model import load_model
from hdee.records import TasksResults
from hdee.tasks import (
    BUILTIN_TASKS,
    _documents,
    build_builtin_tasks,
    hdee_lm,
    require_harness,
)

pytest.importorskip("lm_eval", reason="hdee[tasks] (lm-evaluation-harness) is not installed")
LIMIT = 6


USERS_FILES = ("tasks/notes.txt", "tasks/sub/keep.txt", "tasks/builtin/notes.txt")


@pytest.fixture(scope="module")
def tasks_run(tiny_finished_run: Path) -> Iterator[Path]:
    """`hdee tasks RUN --tasks builtin` once, through the CLI, with a user's files planted in
    RUN/tasks and RUN/tasks/builtin (hdee never deletes what it did not write)."""
    for name in USERS_FILES:
        (tiny_finished_run / name).parent.mkdir(parents=True, exist_ok=True)
        (tiny_finished_run / name).write_text("mine\n")
    argv = ["tasks", str(tiny_finished_run), "--tasks", "builtin", "--limit", str(LIMIT)]
    assert main([*argv, "--quiet"]) == 0
    yield tiny_finished_run
    for name in USERS_FILES:
        (tiny_finished_run / name).unlink(missing_ok=True)
    (tiny_finished_run / "tasks" / "sub").rmdir()


def test_tasks_keeps_a_users_files_beside_its_own(tasks_run: Path) -> None:
    assert all((tasks_run / name).read_text() == "mine\n" for name in USERS_FILES)
    assert (tasks_run / "tasks" / "results.json").is_file()


def test_builtin_tasks_are_deterministic_and_true(tiny_finished_run: Path, tmp_path: Path) -> None:
    first = build_builtin_tasks(tiny_finished_run, tmp_path / "a")
    second = build_builtin_tasks(tiny_finished_run, tmp_path / "b")
    for name in BUILTIN_TASKS:
        assert (first / f"{name}.jsonl").read_bytes() == (second / f"{name}.jsonl").read_bytes()
    layout = RunLayout.of(tiny_finished_run)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(layout.tokenizer)
    texts = {
        domain: [" ".join(words) for words in _documents(layout.root, domain, tokenizer)]
        for domain in {f"d{i}" for i in range(8)}
    }
    choice_rows = [json.loads(line) for line in (first / "hdee_next_chunk.jsonl").open()]
    cloze_rows = [json.loads(line) for line in (first / "hdee_cloze.jsonl").open()]
    assert len(choice_rows) == len(cloze_rows) > 8
    assert {row["domain"] for row in choice_rows} >= {"d0", "d6"}  # trained and held out
    for row, cloze in zip(choice_rows, cloze_rows, strict=True):
        assert len(set(row["choices"])) == 4
        true = f"{row['context']} {row['choices'][row['gold']]}"
        assert any(true in text for text in texts[row["domain"]])
        # Every choice is text of the same domain.
        assert all(any(c in t for t in texts[row["domain"]]) for c in row["choices"])
        assert f"{cloze['context']} {cloze['target']}" in true + " " or true.startswith(
            f"{cloze['context']} {cloze['target']}"
        )


def requests_for(
    tokenizer: PreTrainedTokenizerFast,
) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    contexts = ["the a of to and in", "he was for on", "the the the of"]
    continuations = [" a", " of to and", " in is it you that", " to"]
    return [
        ((c, x), tokenizer.encode(c), tokenizer.encode(x)) for c in contexts for x in continuations
    ]


@pytest.mark.parametrize("system", ["ensemble", "single"])
def test_adapter_scores_like_the_harness_with_one_context_forward(
    tiny_finished_run: Path, system: str
) -> None:
    """HdeeLM's context-grouped, KV-cached scoring equals the harness's own HFLM path (every
    continuation re-run with its context, right-padded), and runs each context once."""
    from lm_eval.models.huggingface import HFLM

    layout = RunLayout.of(tiny_finished_run)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(layout.tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    if system == "ensemble":
        layout = RunLayout.of(tiny_finished_run)
        config = load_config(layout.config)
        resolved = resolve_ensemble(EnsembleSpec(), config, layout, "MHe-IHo")
        model = build_ensemble(resolved, layout, config.data.seq_len, "cpu")
    else:
        job = layout.job(sorted(layout.jobs.glob("expert-L-*"))[0].name)
        model = load_model(job.final).eval()
    requests = requests_for(tokenizer)
    ours = hdee_lm(model, tokenizer, batch_size=8)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, logits_cache=False)
    got = ours._loglikelihood_tokens(requests, disable_tqdm=True)
    expected = theirs._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in got] == [g for _, g in expected]
    torch.testing.assert_close(
        torch.tensor([lp for lp, _ in got]),
        torch.tensor([lp for lp, _ in expected]),
        atol=1e-4,
        rtol=0,
    )
    # 3 contexts x (one context forward + one batch of its 4 continuations) for 12 requests.
    assert ours.forwards == 6 and ours.requests == 12


def test_tasks_results_report_and_best_single(tasks_run: Path) -> None:
    results = TasksResults.read(RunLayout.of(tasks_run).tasks_results)
    assert results.format == "hdee-tasks" and results.version == 3
    assert results.tasks == list(BUILTIN_TASKS) and results.limit == LIMIT
    ensembles = {n for n, s in results.systems.items() if s.kind == "ensemble"}
    singles = {n: s for n, s in results.systems.items() if s.kind == "single_expert"}
    assert ensembles == {"MHo-IHo", "MHe-IHo"}
    assert len(singles) == 5  # 3 + 3 experts, the moderate one shared
    for name in ensembles:  # each ensemble says which spec it ran
        ensemble = results.systems[name].ensemble
        assert ensemble is not None and ensemble.configuration == name
        assert list(ensemble.members) == results.systems[name].members
        assert ensemble.prior == "uniform" and ensemble.routing == "none"
    for system in results.systems.values():
        assert system.requests > 0 and system.seconds > 0
        assert 0.0 <= system.metrics["hdee_next_chunk"]["acc,none"] <= 1.0
        assert "exact_match,first_word" in system.metrics["hdee_cloze"]
    best = results.best_single["hdee_next_chunk"]["acc,none"]
    assert best.value == max(s.metrics["hdee_next_chunk"]["acc,none"] for s in singles.values())
    assert singles[best.system].metrics["hdee_next_chunk"]["acc,none"] == best.value
    assert main(["report", str(tasks_run)]) == 0
    report = (RunLayout.of(tasks_run).report / "report.md").read_text()
    assert "## Downstream tasks" in report and "| hdee_next_chunk | acc,none |" in report


@pytest.mark.slow
def test_the_harness_cli_on_an_export_agrees(tasks_run: Path, tmp_path: Path) -> None:
    """`lm_eval --model hf --model_args pretrained=OUT,trust_remote_code=True` works on an
    export and scores the ensemble exactly as `hdee tasks` did."""
    out = tmp_path / "MHe-IHo"
    assert main(["export", str(tasks_run), "--configuration", "MHe-IHo", str(out)]) == 0
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={out},trust_remote_code=True",
        "--device", "cpu", "--tasks", "hdee_next_chunk",
        "--include_path", str(RunLayout.of(tasks_run).root / "tasks" / "builtin"),
        "--limit", str(LIMIT), "--output_path", str(tmp_path / "harness"),
    ]  # fmt: skip
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (result_file,) = (tmp_path / "harness").rglob("results_*.json")
    harness = json.loads(result_file.read_text())["results"]["hdee_next_chunk"]
    ours = (
        TasksResults.read(RunLayout.of(tasks_run).tasks_results)
        .systems["MHe-IHo"]
        .metrics["hdee_next_chunk"]
    )
    assert harness["acc,none"] == pytest.approx(ours["acc,none"])
    assert harness["acc_norm,none"] == pytest.approx(ours["acc_norm,none"])


def test_missing_harness_and_bad_tasks_are_one_clear_line(
    tiny_finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assert main(["tasks", str(tiny_finished_run), "--tasks", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such task file" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if hdee[tasks] were not installed
    with pytest.raises(ImportError, match=r"pip install 'hdee\[tasks\]'"):
        require_harness()
    assert main(["tasks", str(tiny_finished_run), "--tasks", "builtin"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hdee[tasks]" in err


def test_builtin_items_take_turns_by_domain_so_a_limit_samples_every_domain() -> None:
    from hdee.tasks import _round_robin

    groups = [[{"d": "a", "i": 1}, {"d": "a", "i": 2}], [{"d": "b", "i": 1}], []]
    assert [(r["d"], r["i"]) for r in _round_robin(groups)] == [("a", 1), ("b", 1), ("a", 2)]
    assert _round_robin([]) == []


def test_an_unknown_task_is_refused_before_any_model_loads(
    tiny_finished_run: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import hdee.export
    import hdee.scoring

    def no_models(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model loaded before the task names were checked")

    monkeypatch.setattr(hdee.export, "build_ensemble", no_models)
    monkeypatch.setattr(hdee.scoring, "load_expert", no_models)
    argv = ["tasks", str(tiny_finished_run), "--tasks", "builtin,hellaswg", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "--tasks: unknown task 'hellaswg'. Available: builtin (hdee's hdee_next_chunk and " in err
    )
    assert "tasks, groups and tags lm-evaluation-harness" in err and "`lm-eval ls tasks`" in err
    assert "closest: hellaswag" in err
