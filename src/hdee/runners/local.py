"""Run a graph of training jobs on this machine.

A job is a TrainSpec file; running it is idempotent (a finished job returns its stored result)
and resumable (an interrupted one continues from its last checkpoint), so the runner only has
to respect dependencies, share the hardware, and retry a job whose worker died.

- workers == 1: jobs run one after another in this process (simplest; what tests use).
- workers > 1: a pool of worker processes; each imports torch once and runs many jobs. On GPUs
  every worker owns one device (CUDA_VISIBLE_DEVICES); on the CPU the cores are divided between
  workers so they do not oversubscribe.
- gpus_per_job > 1: each job is launched with torchrun (DDP over that many GPUs).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hdee.atomic import read_json
from hdee.console import job_log
from hdee.layout import JobLayout
from hdee.processes import die_with_parent
from hdee.records import JobResult

MAX_RETRIES = 2


@dataclass
class JobTask:
    job_id: str
    spec_path: Path
    depends_on: list[str] = field(default_factory=list)


class JobFailed(RuntimeError):
    """One or more jobs failed; finished jobs are kept and a re-run resumes the rest."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU
        return 0


def default_workers(gpus_per_job: int) -> int:
    """One worker per GPU (or per group of gpus_per_job); on the CPU one per 4 cores."""
    gpus = gpu_count()
    if gpus:
        return max(1, gpus // max(1, gpus_per_job))
    return max(1, cpu_count() // 4)


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


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers now instead of waiting for their jobs (Ctrl-C, an error)."""
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(threads: int, device_queue: Any) -> None:
    # Runs once per worker process, before torch does any work.
    die_with_parent()
    if device_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device_queue.get()
    import torch

    torch.set_num_threads(threads)


def run_jobs(
    tasks: list[JobTask],
    workers: int = 0,
    gpus_per_job: int = 1,
    on_done: Callable[[str, JobResult], None] | None = None,
    on_start: Callable[[str], None] | None = None,
    progress: bool = False,
) -> dict[str, JobResult]:
    """Run every task once its dependencies are done. Returns job id -> result.

    `progress`: in-process jobs (workers == 1) draw their progress bar on this terminal; jobs
    in worker processes always write their output to their train.log."""
    by_id = {t.job_id: t for t in tasks}
    for task in tasks:
        for dep in task.depends_on:
            if dep not in by_id:
                raise ValueError(f"job {task.job_id} depends on unknown job {dep}")
    workers = workers or default_workers(gpus_per_job)
    gpus = gpu_count()
    per_job_gpus = gpus_per_job if gpus else 0

    results: dict[str, JobResult] = {}
    failed: dict[str, str] = {}

    def ready() -> list[JobTask]:
        return [
            t
            for t in tasks
            if t.job_id not in results
            and t.job_id not in failed
            and all(d in results for d in t.depends_on)
        ]

    if workers == 1:
        while batch := [t for t in ready() if t.job_id not in results]:
            for task in batch:
                if on_start:
                    on_start(task.job_id)
                try:
                    results[task.job_id] = execute_job(str(task.spec_path), per_job_gpus, progress)
                except Exception as error:  # noqa: BLE001 - reported together at the end
                    failed[task.job_id] = f"{type(error).__name__}: {error}"
                    continue
                if on_done:
                    on_done(task.job_id, results[task.job_id])
        _raise_if_failed(tasks, results, failed)
        return results

    context = multiprocessing.get_context("spawn")
    threads = max(1, cpu_count() // workers)

    def new_pool() -> ProcessPoolExecutor:
        device_queue = None
        if gpus:
            # Every worker owns its GPU, or its group of gpus_per_job GPUs for torchrun: without
            # this, concurrent torchrun jobs would all use devices 0..gpus_per_job-1. A fresh
            # queue per pool: a pool rebuilt after a worker died must find every device free.
            group = max(1, per_job_gpus)
            device_queue = context.Queue()
            for index in range(workers):
                device_queue.put(",".join(str((index * group + k) % gpus) for k in range(group)))
        return ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_init_worker,
            initargs=(threads, device_queue),
        )

    attempts: dict[str, int] = {}
    running: dict[Future, str] = {}
    pool = new_pool()
    try:
        while True:
            for task in ready():
                if task.job_id in running.values():
                    continue
                if on_start:
                    on_start(task.job_id)
                attempts[task.job_id] = attempts.get(task.job_id, 0) + 1
                future = pool.submit(execute_job, str(task.spec_path), per_job_gpus)
                running[future] = task.job_id
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                job_id = running.pop(future)
                try:
                    results[job_id] = future.result()
                except BrokenProcessPool:
                    # A worker died (killed, out of memory). The job resumes from its last
                    # checkpoint in a fresh pool; give up after MAX_RETRIES.
                    broken = True
                    if attempts[job_id] > MAX_RETRIES:
                        failed[job_id] = "worker process died repeatedly"
                    continue
                except Exception as error:  # noqa: BLE001
                    failed[job_id] = f"{type(error).__name__}: {error}"
                    continue
                if on_done:
                    on_done(job_id, results[job_id])
            if broken:
                # Every job in flight in the broken pool is lost; resubmit them too.
                for job_id in running.values():
                    if attempts[job_id] > MAX_RETRIES:
                        failed[job_id] = "worker process died repeatedly"
                running.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) or broken: do not wait for running jobs to finish;
        # they resume from their last checkpoint next time.
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    _raise_if_failed(tasks, results, failed)
    return results


def _raise_if_failed(tasks: list[JobTask], results: dict[str, Any], failed: dict[str, str]) -> None:
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
