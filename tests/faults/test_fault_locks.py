"""Two writers on one run directory: every command that writes into a run takes its lock, so
a second writer is refused with the holder named and nothing is written (issue 14: an
`hdee evaluate --set evaluation.posterior=updating` racing `hdee run --from evaluate` left
results.json and report.md disagreeing). Readers (`hdee generate`, `hdee plan`) do not lock."""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_helpers import copy_run, hdee

from hdee.layout import RunLayout
from hdee.rundir import RunError, run_lock


@pytest.fixture(scope="module")
def run(tiny_cli_run: dict, tmp_path_factory: pytest.TempPathFactory) -> RunLayout:
    return copy_run(tiny_cli_run["run_dir"], tmp_path_factory.mktemp("locks") / "run")


def _snapshot(layout: RunLayout) -> dict[str, bytes]:
    """Every file of the run but the lock itself."""
    return {
        str(p.relative_to(layout.root)): p.read_bytes()
        for p in sorted(layout.root.rglob("*"))
        if p.is_file() and p != layout.lock
    }


@pytest.mark.parametrize(
    "argv",
    [
        ("evaluate", "{run}", "--set", "evaluation.posterior=updating", "--quiet"),
        ("report", "{run}"),
        ("tasks", "{run}", "--tasks", "builtin", "--limit", "2", "--quiet"),
        ("export", "{run}", "{run}/export", "--configuration", "MHo-IHo"),
        ("jobs", "{config}", "experts"),
        ("prepare", "{config}", "--quiet"),
    ],
    ids=lambda argv: argv[0],
)
def test_a_second_writer_is_refused_and_writes_nothing(
    run: RunLayout, tiny_cli_run: dict, tmp_path: Path, argv: tuple[str, ...]
) -> None:
    config = tmp_path / "experiment.yaml"
    config.write_text(
        tiny_cli_run["config_path"].read_text().replace(str(tiny_cli_run["run_dir"]), str(run.root))
    )
    before = _snapshot(run)
    with run_lock(run):  # an `hdee run` writing this directory right now
        code, _, err = hdee(*(a.format(run=run.root, config=config) for a in argv))
    assert code != 0
    assert f"{run.root} is in use by hdee run, pid" in err
    assert _snapshot(run) == before


def test_the_lock_names_its_holder_and_is_released(run: RunLayout) -> None:
    with run_lock(run, "hdee evaluate"):
        with pytest.raises(RunError, match="in use by hdee evaluate, pid"):
            with run_lock(run):
                pass
    with run_lock(run):  # released at the end of the block
        pass


def test_a_reader_does_not_need_the_lock(run: RunLayout) -> None:
    with run_lock(run, "hdee run"):
        code, out, err = hdee(
            "generate",
            str(run.root),
            "--configuration",
            "MHo-IHo",
            "--prompt",
            "the",
            "--max-new-tokens",
            "2",
        )
    assert code == 0, err
    assert out.startswith("the")
