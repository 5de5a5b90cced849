"""`hdee run` end to end on a tiny generated corpus: every stage, resume, lock, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tiny_run_config
from hdee.atomic import read_json
from hdee.cli import main
from hdee.config import UsageError, parse_config
from hdee.layout import RunLayout
from hdee.pipeline import RunError, run_experiment, run_lock, select_stages
from hdee.records import Plan, RecordError


def small_run(tmp_path: Path) -> dict[str, Any]:
    raw = tiny_run_config(tmp_path)
    # 8 domains (6 trainable: two per class for two iterations, 2 held out) keep it quick.
    raw["data"]["domains"] = raw["data"]["domains"][:8]
    raw["plan"]["held_out"] = ["d6", "d7"]
    return raw


def write_config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def result_mtimes(layout: RunLayout) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in layout.jobs.glob("*/result.json")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunLayout]:
    """One complete tiny run through the CLI, shared by the tests that only read it."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    config_path = write_config(tmp_path, small_run(tmp_path))
    assert main(["run", str(config_path), "--quiet"]) == 0
    return config_path, RunLayout.of(tmp_path / "run")


def test_run_produces_every_stage_output(finished_run):
    _, layout = finished_run
    plan = Plan.read(layout.plan)
    assert not plan.provisional
    assert sorted(plan.held_out_domains) == ["d6", "d7"]
    for job_id in plan.jobs:
        assert (layout.job(job_id).result).is_file(), job_id
        assert (layout.job(job_id).final / "model.safetensors").is_file()
        # --quiet: the job's own output went to its log, not the terminal.
        assert "[hdee.train]" in (layout.job(job_id).log).read_text()
    difficulty = read_json(layout.difficulty_record)
    assert set(difficulty["classes"]) == set(plan.trained_domains)
    results = read_json(layout.results)
    assert set(results["configurations"]) == {"MHo-IHo", "MHo-IHe", "MHe-IHo"}
    for configuration in results["configurations"].values():
        final = configuration["iterations"][str(configuration["final_iteration"])]
        assert set(final["domains"]) == {f"d{i}" for i in range(8)}
        for entry in final["domains"].values():
            for method in ("simple_average", "uniform_prior", "cached_prior", "best_single"):
                assert 1.0 < entry["methods"][method]["perplexity"] < 400.0
    report = (layout.report_markdown).read_text()
    assert "A heterogeneous configuration wins" in report
    assert "## Compute budgets" in report
    for png in ("perplexity.png", "posterior.png", "training_curves.png"):
        assert (layout.report / png).stat().st_size > 1000
    assert (layout.difficulty_plot).is_file()


def test_experts_branch_from_their_lane_on_disk(finished_run):
    _, layout = finished_run
    plan = Plan.read(layout.plan)
    for job in plan.expert_jobs():
        spec = read_json(layout.job(job.job_id).spec)
        assert spec["init_from"] == str(layout.job(job.init_from).final)
        assert spec["training"]["steps"] == job.steps
        assert spec["train_tokens"] == str(layout.tokens(job.domain, "train"))


def test_rerun_does_no_work(finished_run):
    config_path, layout = finished_run
    before = result_mtimes(layout)
    results_before = (layout.results).read_text()
    assert main(["run", str(config_path), "--quiet"]) == 0
    assert result_mtimes(layout) == before
    assert (layout.results).read_text() == results_before


def test_plan_command_shows_status(finished_run, capsys):
    config_path, _ = finished_run
    assert main(["plan", str(config_path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "MHe-IHo" in out and "done" in out and "pending" not in out
    plan = json.loads(out[out.index("{\n") :])
    assert len(plan["jobs"]) == 3 + 14


def test_jobs_command_lists_specs_parents_first(finished_run, capsys):
    config_path, layout = finished_run
    assert main(["jobs", str(config_path), "experts"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 14
    seen: set[str] = set()
    for job_id, iteration, parent, spec_path in lines:
        assert parent.startswith("seed-") or parent in seen, "a child listed before its parent"
        seen.add(job_id)
        assert read_json(spec_path)["output_dir"] == str(layout.job(job_id).root)
        assert int(iteration) in (1, 2)


def test_resume_between_and_inside_jobs(tmp_path: Path):
    raw = small_run(tmp_path)
    raw["plan"]["iterations"] = 1
    config = parse_config(raw)
    layout = RunLayout.of(config.run_dir)
    run_experiment(config, until="seeds", progress=False)
    seeds_done = result_mtimes(layout)
    assert len(seeds_done) == 3
    assert not layout.plan.exists()

    # Interrupt one expert mid-run, as a kill would: a checkpoint but no result.
    run_experiment(config, start="difficulty", until="plan", progress=False)
    from hdee.pipeline import prepared_vocab, write_job_spec
    from hdee.train import TrainSpec, run_training

    plan = Plan.read(layout.plan)
    victim = plan.expert_jobs()[0]
    vocab, eos = prepared_vocab(layout)
    spec_path = write_job_spec(config, layout, victim, vocab, eos)
    outcome = run_training(
        TrainSpec.model_validate(read_json(spec_path)), progress=False, stop_after=2
    )
    assert outcome is None  # stopped after step 2, as a kill would
    assert not (layout.job(victim.job_id).result).exists()

    run_experiment(config, start="experts", progress=False)
    after = result_mtimes(layout)
    assert {k: after[k] for k in seeds_done} == seeds_done  # seeds were not retrained
    assert set(after) == set(plan.jobs)
    steps = [
        row["step"]
        for row in map(json.loads, (layout.job(victim.job_id).metrics).read_text().splitlines())
        if "loss" in row
    ]
    assert steps == sorted(set(steps)), "resumed job repeated or lost logged steps"


def test_from_a_stage_whose_inputs_are_missing(tmp_path: Path):
    config = parse_config(small_run(tmp_path))
    with pytest.raises(RecordError, match="plan.json is missing"):
        run_experiment(config, start="experts", progress=False)


def test_lock_stops_a_second_run(tmp_path: Path):
    config = parse_config(small_run(tmp_path))
    with run_lock(RunLayout.of(config.run_dir)):
        with pytest.raises(RunError, match="is in use by hdee run, pid"):
            run_experiment(config, until="prepare", progress=False)


def test_the_prepare_stage_ends_with_its_table(tmp_path: Path):
    import io

    from rich.console import Console

    from hdee.data.tokens import read_manifest

    config = parse_config(small_run(tmp_path))
    console = Console(file=io.StringIO(), width=40)  # a log file, narrower than the table
    layout = run_experiment(config, until="prepare", progress=False, console=console)
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "== prepare =="
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("d", "general"))}
    assert sorted(rows) == ["d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "general"]
    for name, row in rows.items():
        manifest = read_manifest(layout.tokens(name, "test"))
        assert row[1] == "rebuilt"
        assert row[-2:] == [f"{manifest['num_documents']:,}", f"{manifest['num_tokens']:,}"]


def test_stage_selection():
    assert select_stages() == [
        "prepare",
        "seeds",
        "difficulty",
        "plan",
        "experts",
        "evaluate",
        "report",
    ]
    assert select_stages("plan", "experts") == ["plan", "experts"]
    with pytest.raises(UsageError, match="comes after"):
        select_stages("report", "seeds")


def test_cli_reports_bad_config_clearly(tmp_path: Path, capsys):
    raw = small_run(tmp_path)
    raw["plan"]["iterations"] = "three"
    code = main(["run", str(write_config(tmp_path, raw))])
    err = capsys.readouterr().err
    assert code == 2
    assert "experiment.yaml" in err and "plan.iterations" in err
    assert not (tmp_path / "run").exists()


def test_cli_reports_missing_data_clearly(tmp_path: Path, capsys):
    raw = small_run(tmp_path)
    raw["data"]["domains"][2]["source"]["paths"] = [str(tmp_path / "nowhere" / "*.txt")]
    code = main(["run", str(write_config(tmp_path, raw)), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "d2" in err and "nowhere" in err
    assert not (tmp_path / "run" / "jobs").exists()


def test_help_of_every_subcommand(capsys):
    commands = (
        "prepare",
        "discover",
        "plan",
        "jobs",
        "train",
        "run",
        "evaluate",
        "report",
        "generate",
        "migrate",
        "demo",
    )
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: hdee " + command in capsys.readouterr().out


def _children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_sigterm_stops_worker_processes_and_rerun_resumes(tmp_path: Path):
    import signal
    import subprocess
    import sys
    import time

    raw = small_run(tmp_path)
    raw["seeds"]["training"].update(steps=400, checkpoint_every=20, eval_every=400)
    raw["runner"] = {"workers": 2}
    config_path = write_config(tmp_path, raw)
    command = [
        sys.executable,
        "-m",
        "hdee.cli",
        "run",
        str(config_path),
        "--quiet",
        "--until",
        "seeds",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    jobs = tmp_path / "run" / "jobs"
    deadline = time.monotonic() + 120
    while not list(jobs.glob("*/checkpoints/step_*")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no job reached a checkpoint in 120 s"
        time.sleep(0.05)
    workers = _children(process.pid)
    assert workers, "the run had no worker processes"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    assert "run the same command again" in process.stderr.read().decode()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "worker processes outlived the run"
        time.sleep(0.05)

    assert main(["run", str(config_path), "--quiet", "--until", "seeds"]) == 0
    assert len(list(jobs.glob("*/result.json"))) == 3


def test_plan_before_prepare_with_an_unloadable_tokenizer(tmp_path: Path, capsys):
    raw = small_run(tmp_path)
    raw["data"]["tokenizer"] = {"kind": "pretrained", "name_or_path": str(tmp_path / "nope")}
    config_path = write_config(tmp_path, raw)
    assert main(["plan", str(config_path)]) == 1
    assert "--vocab-size" in capsys.readouterr().err
    assert main(["plan", str(config_path), "--vocab-size", "1000"]) == 0
    assert "Provisional plan" in capsys.readouterr().out


@pytest.mark.parametrize(
    "modules",
    [
        "hdee.cli, hdee.data.prepare, hdee.layout, hdee.rundir, hdee.show",  # hdee prepare
        "hdee.cli, hdee.pipeline, hdee.plan, hdee.shapes, hdee.show",  # hdee plan
    ],
)
def test_prepare_and_plan_start_without_torch(modules: str):
    # torch and transformers' model code take seconds to import; neither command needs them.
    code = (
        f"import sys\nimport {modules}\n"
        "print(sorted(m for m in ('torch', 'transformers.models.llama') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
