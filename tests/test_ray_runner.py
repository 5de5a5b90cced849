"""The Ray runner on a local 2-CPU Ray instance: dependencies, concurrency, failures, a worker
killed mid-job (the retry resumes from its checkpoint), and `hdee run --runner ray`."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ray = pytest.importorskip("ray", reason="the Ray runner needs ray: pip install 'hdee[ray]'")

from conftest import tiny_run_config  # noqa: E402
from hdee.atomic import read_json, write_json  # noqa: E402
from hdee.cli import main  # noqa: E402
from hdee.records import JobResult  # noqa: E402
from hdee.runners.local import JobFailed, JobTask  # noqa: E402
from hdee.runners.ray_runner import run_jobs_on_ray  # noqa: E402
from train_helpers import tiny_spec  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    # One instance for the whole file: starting Ray costs ~10 s here. 2 CPUs, so two
    # one-core jobs can run at once; the runner reuses an instance the caller started.
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def job(tmp_path: Path, name: str, depends_on: list[str] | None = None, **training: Any) -> JobTask:
    """A tiny training job whose spec file lives outside its output directory."""
    spec = tiny_spec(tmp_path, output=name, **training)
    path = tmp_path / "specs" / f"{name}.json"
    write_json(path, spec.model_dump(mode="json"))
    return JobTask(name, path, depends_on or [])


def span(output: Path) -> tuple[float, float]:
    """When a job ran: its spec.json is written as training starts, result.json last."""
    return (output / "spec.json").stat().st_mtime, (output / "result.json").stat().st_mtime


def metric_rows(output: Path) -> list[dict[str, Any]]:
    rows = []
    for line in (output / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line half-written when the worker was killed
            pass
    return rows


def test_dependencies_and_concurrency(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []
    tasks = [
        job(tmp_path, "a", steps=100, checkpoint_every=20),
        job(tmp_path, "b", steps=100, checkpoint_every=20, seed=2),
        job(tmp_path, "c", ["a"], steps=8, init_from=str(tmp_path / "a" / "final")),
    ]
    results = run_jobs_on_ray(
        tasks,
        cpus_per_job=1,
        on_start=lambda j: events.append(("start", j)),
        on_done=lambda j, _: events.append(("done", j)),
    )
    assert set(results) == {"a", "b", "c"}
    assert results["a"].steps == 100 and results["c"].steps == 8
    assert results["c"] == JobResult.read(tmp_path / "c" / "result.json")
    # The independent seeds trained at the same time, on their own workers.
    (a0, a1), (b0, b1), (c0, _) = (span(tmp_path / n) for n in "abc")
    assert a0 < b1 and b0 < a1
    # The expert started only after its parent had finished.
    assert c0 >= a1
    assert events.index(("start", "c")) > events.index(("done", "a"))

    # Running the graph again does no work: finished jobs return their stored results.
    mtimes = {n: (tmp_path / n / "result.json").stat().st_mtime_ns for n in "abc"}
    assert run_jobs_on_ray(tasks, cpus_per_job=1) == results
    assert {n: (tmp_path / n / "result.json").stat().st_mtime_ns for n in "abc"} == mtimes


def test_failure_is_reported_and_finished_jobs_are_kept(tmp_path: Path) -> None:
    tasks = [
        job(tmp_path, "ok", steps=2),
        job(tmp_path, "bad", steps=2, init_from=str(tmp_path / "missing")),
        job(tmp_path, "after_bad", ["bad"], steps=2, init_from=str(tmp_path / "bad" / "final")),
    ]
    with pytest.raises(JobFailed) as failure:
        run_jobs_on_ray(tasks, cpus_per_job=1)
    message = str(failure.value)
    assert "1 job(s) failed (1 finished, kept)" in message
    assert "bad: " in message and "missing" in message
    assert "not started because a dependency failed: after_bad" in message
    assert (tmp_path / "ok" / "result.json").is_file()
    with pytest.raises(ValueError, match="unknown job"):
        run_jobs_on_ray([job(tmp_path, "orphan", ["nope"])])


def ray_worker_pid(job_id: str) -> int | None:
    """The worker running `job_id`: Ray titles it `ray::<task name>`, the runner's task name
    being the job id (Linux /proc; psutil is not a dependency of the tests)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:  # exited meanwhile
            continue
        if title == f"ray::{job_id}".encode():
            return int(proc.name)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker via /proc")
def test_killed_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    task = job(tmp_path, "victim", steps=150, checkpoint_every=4, eval_every=50)
    output = tmp_path / "victim"
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["results"] = run_jobs_on_ray([task], cpus_per_job=1)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = error

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 60
    while not list((output / "checkpoints").glob("step_*")):
        assert time.monotonic() < deadline and runner.is_alive(), "no checkpoint appeared"
        time.sleep(0.05)
    pid = ray_worker_pid("victim")
    assert pid is not None, "no process titled ray::victim"
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    assert not (output / "result.json").exists(), "the job finished before it was killed"
    # What the killed worker left: its newest complete checkpoint and the log up to it.
    resume_step = max(int(p.name.split("_")[1]) for p in (output / "checkpoints").glob("step_*"))
    logged = [r for r in metric_rows(output) if r["step"] <= resume_step]

    runner.join(timeout=90)
    assert not runner.is_alive(), "the retried job did not finish"
    if "error" in outcome:
        raise outcome["error"]
    assert outcome["results"]["victim"].steps == 150
    assert (output / "result.json").stat().st_mtime > killed_at
    assert ray_worker_pid("victim") is None
    rows = metric_rows(output)
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 150
    # Resumed, not restarted: the rows logged before the kill (timings included, which a
    # second run would not reproduce) are still the start of the log.
    assert resume_step >= 4 and logged and rows[: len(logged)] == logged


def test_hdee_run_with_the_ray_runner_matches_the_local_runner(tmp_path: Path) -> None:
    raw = tiny_run_config(tmp_path)
    # One seed and three experts (one lane each, one iteration) keep both runs to seconds.
    raw["data"]["domains"] = raw["data"]["domains"][:4]
    raw["plan"].update(held_out=["d3"], iterations=1)
    raw["plan"]["configurations"] = raw["plan"]["configurations"][:1]
    runs = {}
    for runner in ("ray", "local"):
        runs[runner] = tmp_path / f"run-{runner}"
        config = tmp_path / f"{runner}.yaml"
        config.write_text(yaml.safe_dump({**raw, "run_dir": str(runs[runner])}))
        command = ["run", str(config), "--quiet", "--until", "experts", "--runner", runner]
        assert main(command) == 0

    plan = read_json(runs["ray"] / "plan.json")
    assert plan == read_json(runs["local"] / "plan.json")
    assert len(plan["jobs"]) == 4
    for job_id in plan["jobs"]:
        on_ray, local = (read_json(runs[r] / "jobs" / job_id / "result.json") for r in runs)
        assert on_ray["steps"] == local["steps"] and on_ray["tokens"] == local["tokens"]
        for name, values in local["validation"].items():
            assert on_ray["validation"][name]["loss"] == pytest.approx(values["loss"], rel=1e-5)
