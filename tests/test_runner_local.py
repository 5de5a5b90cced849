"""The local runner's failure paths: a job that raises, a worker process that dies.

Either way the run must end (never hang) with `JobFailed` naming the job and why, keep what
finished, and list the jobs a failure blocked. Real training specs where a real failure is
easy to make (a missing token file); stand-in jobs (`runner_fake_jobs`) for killed workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hdee.runners.local import MAX_RETRIES, JobFailed, JobTask, run_jobs
from train_helpers import tiny_spec

TESTS = Path(__file__).parent


def real_spec(tmp_path: Path, job_id: str, missing_tokens: bool = False) -> Path:
    """A tiny real training job's spec file (4 steps); with `missing_tokens` it fails at start."""
    spec = tiny_spec(tmp_path, output=f"jobs/{job_id}", steps=4, eval_every=4)
    if missing_tokens:
        spec = spec.model_copy(update={"train_tokens": str(tmp_path / "nowhere" / "train.bin")})
    path = tmp_path / "specs" / f"{job_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.model_dump_json())
    return path


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_is_named_finished_kept_dependents_blocked(tmp_path: Path, workers: int):
    tasks = [
        JobTask("good", real_spec(tmp_path, "good")),
        JobTask("broken", real_spec(tmp_path, "broken", missing_tokens=True)),
        JobTask("child", real_spec(tmp_path, "child"), depends_on=["broken"]),
    ]
    done: list[str] = []
    with pytest.raises(JobFailed) as failure:
        run_jobs(tasks, workers=workers, on_done=lambda job_id, _: done.append(job_id))
    message = str(failure.value)
    assert "1 job(s) failed (1 finished, kept)" in message
    assert "broken: ValueError:" in message and "nowhere" in message  # which job, and why
    assert "not started because a dependency failed: child" in message
    assert done == ["good"]
    assert (tmp_path / "jobs" / "good" / "result.json").is_file()
    assert not (tmp_path / "jobs" / "child").exists()


def run_fake_chain(tmp_path: Path, chain: list[tuple[str, str]]) -> dict[str, Any]:
    """Run stand-in jobs one after another (each depends on the one before, so only one is in
    flight) in 2 pool workers, in a child process with a deadline: a hang fails the test."""
    arguments, previous = [], ""
    for job_id, behaviour in chain:
        spec = tmp_path / job_id / "spec.json"
        spec.parent.mkdir(parents=True)
        spec.write_text(json.dumps({"output_dir": str(spec.parent), "behaviour": behaviour}))
        arguments.append(f"{spec}:{previous}" if previous else str(spec))
        previous = job_id
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    code = "import runner_fake_jobs; runner_fake_jobs.main()"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, "2", *arguments],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the runner hung: {error.stderr!r}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def starts(tmp_path: Path, job_id: str) -> int:
    return len((tmp_path / job_id / "attempts").read_text().splitlines())


def test_dead_workers_retry_then_fail_naming_the_job(tmp_path: Path):
    chain = [
        ("flaky", "die_once"),  # its worker exits (os._exit) once; the retry finishes it
        ("after-flaky", "ok"),
        ("doomed", "sigkill"),  # its worker is killed every time
        ("after-doomed", "ok"),
    ]
    outcome = run_fake_chain(tmp_path, chain)
    assert outcome["finished"] == ["flaky", "after-flaky"]
    assert starts(tmp_path, "flaky") == 2
    assert starts(tmp_path, "doomed") == MAX_RETRIES + 1
    assert not (tmp_path / "after-doomed" / "attempts").exists()
    message = outcome["error"]
    assert "1 job(s) failed (2 finished, kept)" in message
    assert "doomed: worker process died repeatedly" in message
    assert "not started because a dependency failed: after-doomed" in message
