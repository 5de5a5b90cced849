"""Run a graph of training jobs on this machine (`runner.kind: local`; the contract is
`hdee.runners.base.Runner`).

- workers == 1: jobs run one after another in this process (simplest; what tests use).
- workers > 1: a pool of worker processes; each imports torch once and runs many jobs. On GPUs
  every worker owns one device (CUDA_VISIBLE_DEVICES); on the CPU the cores are divided between
  workers so they do not oversubscribe.
- gpus_per_job > 1: each job is launched with torchrun (DDP over that many GPUs).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from hdee.processes import die_with_parent
from hdee.records import JobResult
from hdee.runners.base import (
    MAX_RETRIES,
    JobFailed,
    JobTask,
    OnDone,
    OnStart,
    Runner,
    check_dependencies,
    execute_job,
    raise_if_failed,
)

__all__ = ["MAX_RETRIES", "JobFailed", "JobTask", "LocalRunner", "execute_job", "run_jobs"]


class LocalRunner(Runner):
    """`runner: {kind: local, workers, gpus_per_job}`: `run_jobs` on this machine."""

    def __init__(self, config: Any) -> None:
        self.workers = config.workers
        self.gpus_per_job = config.gpus_per_job

    def run(
        self,
        tasks: list[JobTask],
        on_start: OnStart | None = None,
        on_done: OnDone | None = None,
        progress: bool = False,
    ) -> dict[str, JobResult]:
        return run_jobs(tasks, self.workers, self.gpus_per_job, on_done, on_start, progress)


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
    on_done: OnDone | None = None,
    on_start: OnStart | None = None,
    progress: bool = False,
) -> dict[str, JobResult]:
    """Run every task once its dependencies are done. Returns job id -> result.

    `progress`: in-process jobs (workers == 1) draw their progress bar on this terminal; jobs
    in worker processes always write their output to their train.log."""
    check_dependencies(tasks)
    workers = workers or default_workers(gpus_per_job)
    per_job_gpus = gpus_per_job if gpu_count() else 0
    graph = _Graph(tasks)
    if workers == 1:
        while batch := graph.ready():
            for task in batch:
                if on_start:
                    on_start(task.job_id)
                try:
                    result = execute_job(str(task.spec_path), per_job_gpus, progress)
                except Exception as error:  # noqa: BLE001 - reported together at the end
                    graph.failed[task.job_id] = f"{type(error).__name__}: {error}"
                    continue
                graph.results[task.job_id] = result
                if on_done:
                    on_done(task.job_id, result)
    else:
        _run_in_pool(graph, workers, per_job_gpus, on_done, on_start)
    raise_if_failed(tasks, graph.results, graph.failed)
    return graph.results


class _Graph:
    """The jobs, those finished (results) and those failed (reasons)."""

    def __init__(self, tasks: list[JobTask]) -> None:
        self.tasks = tasks
        self.results: dict[str, JobResult] = {}
        self.failed: dict[str, str] = {}

    def ready(self) -> list[JobTask]:
        """Tasks not run yet whose dependencies have all finished."""
        return [
            t
            for t in self.tasks
            if t.job_id not in self.results
            and t.job_id not in self.failed
            and all(d in self.results for d in t.depends_on)
        ]


def _new_pool(workers: int, per_job_gpus: int) -> ProcessPoolExecutor:
    context = multiprocessing.get_context("spawn")
    threads = max(1, cpu_count() // workers)
    gpus = gpu_count()
    device_queue = None
    if gpus:
        # Every worker owns its GPU, or its group of gpus_per_job GPUs for torchrun: without
        # this, concurrent torchrun jobs would all use devices 0..gpus_per_job-1. A fresh queue
        # per pool: a pool rebuilt after a worker died must find every device free.
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


def _run_in_pool(
    graph: _Graph,
    workers: int,
    per_job_gpus: int,
    on_done: OnDone | None,
    on_start: OnStart | None,
) -> None:
    """Run the graph on a pool of worker processes; a job whose worker died is resubmitted to
    a fresh pool (it resumes from its last checkpoint), at most MAX_RETRIES times."""
    attempts: dict[str, int] = {}
    running: dict[Future, str] = {}
    pool = _new_pool(workers, per_job_gpus)
    try:
        while True:
            for task in graph.ready():
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
                    graph.results[job_id] = future.result()
                except BrokenProcessPool:
                    # A worker died (killed, out of memory): every job in flight is lost.
                    broken = True
                    if attempts[job_id] > MAX_RETRIES:
                        graph.failed[job_id] = "worker process died repeatedly"
                    continue
                except Exception as error:  # noqa: BLE001
                    graph.failed[job_id] = f"{type(error).__name__}: {error}"
                    continue
                if on_done:
                    on_done(job_id, graph.results[job_id])
            if broken:
                for job_id in running.values():
                    if attempts[job_id] > MAX_RETRIES:
                        graph.failed[job_id] = "worker process died repeatedly"
                running.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = _new_pool(workers, per_job_gpus)
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM) or broken: do not wait for running jobs to finish;
        # they resume from their last checkpoint next time.
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
