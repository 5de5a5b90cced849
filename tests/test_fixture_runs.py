"""Run directories that outlive a release: the finished tiny run each released hdee wrote
(tests/fixtures/runs/<version>/, made by scripts/make-fixture-run.py) must still read, evaluate
to its stored perplexities, export and resume for one more iteration under this hdee; and
`hdee migrate` rewrites records of older versions in the current shape.

Every check runs on a copy in tmp_path: the fixtures are never written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from hdee import __version__
from hdee.cli import main
from hdee.layout import RunLayout
from hdee.migrate import record_paths
from hdee.records import EvaluationResults, JobResult, Plan, TasksResults

EVALUATION_VERSION = EvaluationResults.model_fields["version"].default
TASKS_VERSION = TasksResults.model_fields["version"].default

FIXTURES = Path(__file__).parent / "fixtures" / "runs"
VERSIONS = sorted(path.name for path in FIXTURES.iterdir() if path.is_dir())


def copy_of(version: str, tmp_path: Path) -> Path:
    run = tmp_path / f"run-{version}"
    shutil.copytree(FIXTURES / version, run)
    return run


def hdee(*argv: str) -> int:
    return main([str(arg) for arg in argv])


def leaves(tree: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every scalar of a JSON tree by its key path (list items by index)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = ((str(i), value) for i, value in enumerate(tree))
    else:
        return {path: tree}
    found: dict[tuple[str, ...], Any] = {}
    for key, value in items:
        found.update(leaves(value, (*path, str(key))))
    return found


def test_this_release_has_its_fixture() -> None:
    """A release adds the run it writes (docs/releasing.md); none is from a later version."""
    from packaging.version import Version

    assert __version__ in VERSIONS, (
        f"no fixture for hdee {__version__}: run `python scripts/make-fixture-run.py`"
    )
    assert all(Version(version) <= Version(__version__) for version in VERSIONS)


@pytest.mark.parametrize("version", VERSIONS)
def test_fixture_holds_only_what_later_versions_read(version: str) -> None:
    files = [path for path in (FIXTURES / version).rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 4_000_000
    suffixes = {path.suffix for path in files}
    assert not suffixes & {".pt", ".pth", ".pkl", ".pickle", ".ckpt"}  # no pickles, ever
    assert not any("logprobs" in path.parts or "checkpoints" in path.parts for path in files)


def test_git_ignores_no_fixture_file() -> None:
    """A fixture file that .gitignore matched would pass here and be missing from a clone."""
    import subprocess

    root = FIXTURES.parents[2]
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(path.relative_to(root)) for path in FIXTURES.rglob("*") if path.is_file()]
    ignored = subprocess.run(
        [git, "check-ignore", "--no-index", *files], cwd=root, capture_output=True, text=True
    )
    assert ignored.returncode == 1 and not ignored.stdout, ignored.stdout


@pytest.mark.parametrize("version", VERSIONS)
def test_every_record_reads(version: str) -> None:
    layout = RunLayout.of(FIXTURES / version)
    records = {path: kind.read(path) for path, kind in record_paths(layout)}
    plan = Plan.read(layout.plan)
    assert set(records) >= {layout.plan, layout.difficulty_record, layout.results}
    for job_id in plan.jobs:  # a finished run: every planned job has its result
        assert isinstance(records[layout.job(job_id).result], JobResult)
    results = records[layout.results]
    assert isinstance(results, EvaluationResults)
    assert set(results.configurations) == set(plan.configurations)


@pytest.mark.parametrize("version", VERSIONS)
def test_evaluate_reproduces_the_stored_perplexities(
    version: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hdee evaluate` on a copy (no cached log-probs: every expert runs again) gives every
    perplexity results.json holds, to 1e-6 relative, and every count exactly."""
    run = copy_of(version, tmp_path)
    stored = json.loads((run / "evaluation" / "results.json").read_text())
    # The fixture was scored on a CPU (fp32, the same numbers on every CPU); a GPU scores in
    # bf16, so this check runs where the fixture did.
    monkeypatch.setattr("hdee.evaluate.resolve_device", lambda: torch.device(stored["device"]))
    assert hdee("evaluate", run, "--quiet") == 0
    again = leaves(json.loads((run / "evaluation" / "results.json").read_text()))
    compared = 0
    for path, value in leaves(stored).items():
        if path[-1] in ("perplexity", "with_members", "without_members"):
            assert again[path] == pytest.approx(value, rel=1e-6), path
            compared += 1
        elif path[-1] in ("tokens", "test_windows", "validation_windows", "job_id"):
            assert again[path] == value, path
    assert compared > 50


@pytest.mark.parametrize("version", VERSIONS)
def test_export_scores_as_the_stored_evaluation(version: str, tmp_path: Path) -> None:
    """`hdee export` of a copy gives a transformers model whose uniform-prior perplexity on a
    trained and the held-out domain is the one the fixture's results.json holds."""
    from transformers import AutoModelForCausalLM

    from hdee.config import load_config
    from hdee.data.loaders import eval_batches
    from hdee.data.tokens import load_tokens

    run = copy_of(version, tmp_path)
    layout = RunLayout.of(run)
    config = load_config(layout.config, overrides={"run_dir": str(run)})
    results = EvaluationResults.read(layout.results)
    configuration = sorted(results.configurations)[0]
    out = tmp_path / "export"
    assert (
        hdee("export", run, "--configuration", configuration, "--posterior", results.posterior, out)
        == 0
    )
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    plan = Plan.read(layout.plan)
    final = results.configurations[configuration].final
    for domain in (plan.trained_domains[0], plan.held_out_domains[-1]):
        tokens = load_tokens(layout.tokens(domain, "test"))
        batches = eval_batches(tokens, config.data.seq_len, 4, config.evaluation.max_test_sequences)
        with torch.no_grad():
            rows = [
                torch.log_softmax(model(batch[:, :-1]).logits, -1).gather(2, batch[:, 1:, None])
                for batch in batches
            ]
        perplexity = torch.exp(-torch.cat(rows).double().mean()).item()
        expected = final.domains[domain].methods["uniform_prior"].perplexity
        assert perplexity == pytest.approx(expected, rel=1e-5), domain


@pytest.mark.parametrize("version", VERSIONS)
def test_resume_for_one_more_iteration(
    version: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`hdee run` on a copy with plan.iterations one higher plans the same first iterations
    (same job ids: nothing trained again) and trains the next iteration's experts from the
    stored ones."""
    run = copy_of(version, tmp_path)
    layout = RunLayout.of(run)
    before = Plan.read(layout.plan)
    weights = {
        job_id: layout.job(job_id).final.joinpath("model.safetensors") for job_id in before.jobs
    }
    stored = {job_id: path.read_bytes() for job_id, path in weights.items()}
    more = f"plan.iterations={before.iterations + 1}"
    argv = ["run", layout.config, "--set", f"run_dir={run}", "--set", more]
    assert hdee(*argv, "--from", "plan", "--until", "experts", "--quiet") == 0
    capsys.readouterr()
    after = Plan.read(layout.plan)
    assert after.iterations == before.iterations + 1
    for name, planned in before.configurations.items():
        assert after.configurations[name].ensembles[: before.iterations] == planned.ensembles
    assert {job_id: path.read_bytes() for job_id, path in weights.items()} == stored
    new = [job for job in after.expert_jobs() if job.iteration == after.iterations]
    assert new and all(job.init_from in before.jobs for job in new)
    for job in new:
        assert JobResult.read(layout.job(job.job_id).result).steps == job.steps


# ----------------------------------------------------------------------------------------------
# hdee migrate


def as_evaluation_v3(path: Path) -> None:
    """Rewrite results.json as hdee wrote version 3: no ensemble specs, no opt-out study."""
    data = json.loads(path.read_text())
    data["version"] = 3
    data.pop("opt_out", None)
    for configuration in data["configurations"].values():
        for iteration in configuration["iterations"].values():
            iteration.pop("ensemble", None)
    path.write_text(json.dumps(data, indent=2) + "\n")


@pytest.mark.parametrize("version", VERSIONS)
def test_migrate_brings_every_fixture_to_the_current_versions(
    version: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(version, tmp_path)
    assert hdee("migrate", run) == 0
    for path, kind in record_paths(RunLayout.of(run)):
        assert json.loads(path.read_text())["version"] == kind.expected()[1], path
    migrated = tree_bytes(run)
    assert hdee("migrate", run) == 0
    assert tree_bytes(run) == migrated
    capsys.readouterr()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_migrate_upgrades_an_old_record_that_reads_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(VERSIONS[-1], tmp_path)
    layout = RunLayout.of(run)
    as_evaluation_v3(layout.results)
    old = EvaluationResults.read(layout.results)
    assert old.version == 3
    untouched = {p: b for p, b in tree_bytes(run).items() if p != "evaluation/results.json"}

    assert hdee("migrate", run, "--dry-run") == 0
    out = capsys.readouterr().out
    assert (
        "evaluation/results.json" in out
        and f"3 -> {EVALUATION_VERSION}" in out
        and "would upgrade" in out
    )
    assert json.loads(layout.results.read_text())["version"] == 3  # a dry run writes nothing

    assert hdee("migrate", run) == 0
    out = capsys.readouterr().out
    assert "1 of" in out and "upgraded" in out
    new = EvaluationResults.read(layout.results)
    assert json.loads(layout.results.read_text())["version"] == EVALUATION_VERSION
    assert new == old.model_copy(update={"version": EVALUATION_VERSION})
    after = tree_bytes(run)
    assert {
        p: b for p, b in after.items() if p not in ("evaluation/results.json", "run.lock")
    } == untouched
    assert not [name for name in after if name.endswith(".tmp")]  # written through a rename

    upgraded = layout.results.read_bytes()
    assert hdee("migrate", run) == 0  # idempotent
    assert layout.results.read_bytes() == upgraded
    assert "nothing to do" in capsys.readouterr().out


def test_migrate_upgrades_tasks_results_version_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tasks/results.json as hdee wrote version 1 (no resolved ensemble per system) is
    rewritten as version 2 and reads the same; the run's other records stay as they were."""
    run = copy_of(VERSIONS[-1], tmp_path)
    layout = RunLayout.of(run)
    plan = Plan.read(layout.plan)
    configuration = sorted(plan.configurations)[0]
    _, members = plan.ensemble(configuration)
    expert = next(iter(members.values()))
    version_1 = {
        "format": "hdee-tasks",
        "version": 1,
        "tasks": ["next_chunk"],
        "posterior": "prefix",
        "harness_version": "0.4.9",
        "higher_is_better": {"next_chunk": {"acc,none": True}},
        "systems": {
            configuration: {
                "kind": "ensemble",
                "configuration": configuration,
                "members": list(members),
                "metrics": {"next_chunk": {"acc,none": 0.5}},
                "requests": 8,
                "seconds": 0.25,
            },
            expert: {
                "kind": "single_expert",
                "job_id": expert,
                "metrics": {"next_chunk": {"acc,none": 0.25}},
                "requests": 8,
                "seconds": 0.125,
            },
        },
        "best_single": {"next_chunk": {"acc,none": {"system": expert, "value": 0.25}}},
    }
    layout.tasks_results.parent.mkdir()
    layout.tasks_results.write_text(json.dumps(version_1, indent=2))
    old = TasksResults.read(layout.tasks_results)
    others = {p: b for p, b in tree_bytes(run).items() if not p.startswith("tasks/")}
    assert hdee("migrate", run) == 0
    assert "1 of" in capsys.readouterr().out
    assert json.loads(layout.tasks_results.read_text())["version"] == TASKS_VERSION
    assert TasksResults.read(layout.tasks_results) == old.model_copy(
        update={"version": TASKS_VERSION}
    )
    after = tree_bytes(run)
    assert {p: b for p, b in after.items() if p not in others and p != "run.lock"} == {
        "tasks/results.json": layout.tasks_results.read_bytes()
    }
    assert {p: after[p] for p in others} == others


def test_migrate_on_a_current_run_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(VERSIONS[-1], tmp_path)
    before = tree_bytes(run)
    assert hdee("migrate", run) == 0
    assert tree_bytes(run) == before  # not even a lock file
    assert "nothing to do" in capsys.readouterr().out


def test_migrate_reads_every_record_before_writing_any(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record this hdee cannot read (plan.json version 1) stops the migration, named, with
    exit 1, and the upgradable results.json is left as it was."""
    run = copy_of(VERSIONS[-1], tmp_path)
    layout = RunLayout.of(run)
    as_evaluation_v3(layout.results)
    plan = json.loads(layout.plan.read_text())
    layout.plan.write_text(json.dumps({**plan, "version": 1}))
    results = layout.results.read_bytes()
    assert hdee("migrate", run) == 1
    err = capsys.readouterr().err
    assert str(layout.plan) in err and "version 1" in err
    assert layout.results.read_bytes() == results


def test_migrate_refuses_a_record_from_a_newer_hdee(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_of(VERSIONS[-1], tmp_path)
    layout = RunLayout.of(run)
    data = json.loads(layout.results.read_text())
    layout.results.write_text(json.dumps({**data, "version": 99}))
    assert hdee("migrate", run) == 1
    err = capsys.readouterr().err
    assert str(layout.results) in err and "newer hdee" in err


def test_migrate_of_a_path_that_is_no_run_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-run"
    assert hdee("migrate", missing) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()  # nothing made there
