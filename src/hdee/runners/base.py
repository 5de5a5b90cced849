"""The seam between `hdee run` and where training jobs run: a `Runner` runs a graph of jobs.

A job is a TrainSpec file; running it is idempotent (a finished job returns its stored result)
and resumable (an interrupted one continues from its last checkpoint), so a runner only has to
respect dependencies, share the hardware, retry a job whose worker died, and report failures
together at the end with finished jobs kept. Each runner is one module built from its config
(`RunnerConfig`'s `kind` picks it, `runner_for`): `local.py` (this machine) and `ray_runner.py`
(a Ray cluster); a Slurm runner would be one more file and one more line in `RUNNERS`.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hdee.atomic import read_json
from hdee.console import job_log
from hdee.layout import JobLayout
from hdee.records import JobResult

MAX_RETRIES = 2  # a job whose worker died is run again this many times (it resumes)

OnStart = Callable[[str], None]
OnDone = Callable[[str, JobResult], None]


@dataclass
class JobTask:
    job_id: str
    spec_path: Path
    depends_on: list[str] = field(default_factory=list)


class JobFailed(RuntimeError):
    """One or more jobs failed; finished jobs are kept and a re-run resumes the rest."""


class Runner(ABC):
    """Runs every task once its dependencies are done; returns job id -> result, or raises
    `JobFailed` naming every failed job once the others have run."""

    @abstractmethod
    def run(
        self,
        tasks: list[JobTask],
        on_start: OnStart | None = None,
        on_done: OnDone | None = None,
        progress: bool = False,
    ) -> dict[str, JobResult]: ...


# kind -> "module:class", imported only when that kind runs (Ray is an optional dependency).
RUNNERS = {
    "local": "hdee.runners.local:LocalRunner",
    "ray": "hdee.runners.ray_runner:RayRunner",
}


def runner_for(config: Any) -> Runner:
    """The runner a `RunnerConfig` describes."""
    module, name = RUNNERS[config.kind].split(":")
    return getattr(importlib.import_module(module), name)(config)


def execute_job(spec_path: str, gpus: int = 0, show_progress: bool = False) -> JobResult:
    """Run one job to completion in this process (or under torchrun for several GPUs).

    With `show_progress` the job shows its progress here (as HDEE_PROGRESS says, see
    console.py); otherwise (pool workers, Ray tasks, --quiet) everything it prints goes to
    RUN/jobs/<id>/train.log, progress as plain lines, so concurrent jobs never interleave and a
    finished job's log stays beside its checkpoints.
    """
    job = JobLayout(Path(read_json(spec_path)["output_dir"]))
    if show_progress:
        return _execute(spec_path, gpus, job, progress=True)
    with job_log(job.log) as log:
        return _execute(spec_path, gpus, job, progress=True, log=log)


def _execute(
    spec_path: str, gpus: int, job: JobLayout, progress: bool, log: IO[str] | None = None
) -> JobResult:
    if gpus > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={gpus}",
            "-m",
            "hdee.train",
            spec_path,
        ]
        subprocess.run(command, check=True, stdout=log, stderr=log)
        return JobResult.read(job.result)
    from hdee.train import TrainSpec, run_training

    result = run_training(TrainSpec.model_validate(read_json(spec_path)), progress=progress)
    assert result is not None  # no stop_after: the job ran to its end
    return result


def check_dependencies(tasks: list[JobTask]) -> None:
    by_id = {t.job_id for t in tasks}
    for task in tasks:
        for dep in task.depends_on:
            if dep not in by_id:
                raise ValueError(f"job {task.job_id} depends on unknown job {dep}")


def raise_if_failed(tasks: list[JobTask], results: dict[str, Any], failed: dict[str, str]) -> None:
    """`JobFailed` listing each failed job, and those not started because a dependency failed."""
    if not failed:
        return
    blocked = [t.job_id for t in tasks if t.job_id not in results and t.job_id not in failed]
    lines = [f"{len(failed)} job(s) failed ({len(results)} finished, kept):"]
    lines += [f"  {job_id}: {reason}" for job_id, reason in failed.items()]
    if blocked:
        lines.append(f"  not started because a dependency failed: {', '.join(blocked)}")
    lines.append(
        "Each job's output is in RUN/jobs/<job>/train.log. Fix the cause and run the same "
        "command again: finished jobs are skipped."
    )
    raise JobFailed("\n".join(lines))
