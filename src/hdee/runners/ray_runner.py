"""Run a graph of training jobs on a Ray cluster (or a local Ray instance).

`runner.kind: ray`; the contract is `hdee.runners.base.Runner`: a job is submitted once its
dependencies have finished, independent jobs run at the same time, and failures are reported
together at the end with finished jobs kept. Each job is one Ray task holding `gpus_per_job` GPUs (torchrun inside
the task for more than one) or, on a cluster without GPUs, CPU cores only.

A worker that dies (killed node, out-of-memory kill) is retried by Ray (`max_retries`); as
training is resumable the retry continues from the job's last checkpoint. Every node reads and
writes the run directory by the same path, so on a multi-node cluster it must live on shared
storage (NFS, Lustre, ...), and hdee must be installed on every node.
"""

from __future__ import annotations

from typing import Any

from hdee.records import JobResult
from hdee.runners.base import (
    MAX_RETRIES,
    JobTask,
    OnDone,
    OnStart,
    Runner,
    check_dependencies,
    execute_job,
    raise_if_failed,
)

CPUS_PER_CPU_JOB = 4  # as the local runner: on the CPU one job per 4 cores


def _train_job(spec_path: str, gpus: int, threads: int) -> JobResult:
    """The Ray task: one job on a worker, with as many torch threads as it was given cores."""
    import torch

    torch.set_num_threads(threads)
    return execute_job(spec_path, gpus)


def _default_cpus(ray: Any, per_job_gpus: int) -> int:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpus = max(int(r.get("CPU", 0)) for r in nodes) if nodes else 1
    if per_job_gpus:
        # A node's cores shared between its GPUs: the GPU trains, the cores feed it.
        cpus = sum(r.get("CPU", 0) for r in nodes)
        gpus = sum(r.get("GPU", 0) for r in nodes)
        return max(1, min(node_cpus, int(cpus // gpus) * per_job_gpus))
    # Never more than the largest node has, or the task could not be scheduled at all.
    return max(1, min(CPUS_PER_CPU_JOB, node_cpus))


class RayRunner(Runner):
    """`runner: {kind: ray, address, gpus_per_job, cpus_per_job}`: `run_jobs_on_ray`."""

    def __init__(self, config: Any) -> None:
        self.address = config.address
        self.gpus_per_job = config.gpus_per_job
        self.cpus_per_job = config.cpus_per_job

    def run(
        self,
        tasks: list[JobTask],
        on_start: OnStart | None = None,
        on_done: OnDone | None = None,
        progress: bool = False,
    ) -> dict[str, JobResult]:
        return run_jobs_on_ray(
            tasks, self.address, self.gpus_per_job, self.cpus_per_job, on_start, on_done
        )


def run_jobs_on_ray(
    tasks: list[JobTask],
    address: str | None = None,
    gpus_per_job: int = 1,
    cpus_per_job: int | None = None,
    on_start: OnStart | None = None,
    on_done: OnDone | None = None,
) -> dict[str, JobResult]:
    """Run every task on Ray once its dependencies are done. Returns job id -> result.

    `address`: an existing cluster (`ray start --head` prints it); None starts a local Ray
    instance. Either stays up for the rest of this process, so the seeds and the experts stages
    share it; a caller that has already called `ray.init` keeps its own.
    """
    try:
        import ray
    except ImportError as error:
        raise ImportError("the Ray runner needs Ray: pip install 'hdee[ray]'") from error

    check_dependencies(tasks)
    if not ray.is_initialized():
        ray.init(address=address)
    per_job_gpus = gpus_per_job if ray.cluster_resources().get("GPU", 0) else 0
    cpus = cpus_per_job or _default_cpus(ray, per_job_gpus)
    # A worker death is retried (the job resumes from its checkpoint); an exception raised by
    # training is not, as it would fail again the same way.
    train_job = ray.remote(
        num_cpus=cpus, num_gpus=per_job_gpus, max_retries=MAX_RETRIES, retry_exceptions=False
    )(_train_job)

    results: dict[str, JobResult] = {}
    failed: dict[str, str] = {}
    running: dict[Any, str] = {}  # ObjectRef -> job id
    try:
        while True:
            for task in tasks:
                if (
                    task.job_id in results
                    or task.job_id in failed
                    or task.job_id in running.values()
                    or not all(d in results for d in task.depends_on)
                ):
                    continue
                if on_start:
                    on_start(task.job_id)
                # Named after the job, so the dashboard and `ps` (ray::<job id>) show which.
                ref = train_job.options(name=task.job_id).remote(
                    str(task.spec_path.resolve()), per_job_gpus, cpus
                )
                running[ref] = task.job_id
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1)
            job_id = running.pop(done[0])
            try:
                results[job_id] = ray.get(done[0])
            except ray.exceptions.RayTaskError as error:
                cause = error.cause or error
                failed[job_id] = f"{type(cause).__name__}: {cause}"
                continue
            except ray.exceptions.WorkerCrashedError:
                failed[job_id] = f"worker process died {MAX_RETRIES + 1} times"
                continue
            except ray.exceptions.RayError as error:  # e.g. killed for memory, node lost
                failed[job_id] = f"{type(error).__name__}: {error}"
                continue
            if on_done:
                on_done(job_id, results[job_id])
    finally:
        # Interrupted (Ctrl-C, a failing callback): stop this run's jobs on the cluster too.
        for ref in running:
            ray.cancel(ref, force=True)
    raise_if_failed(tasks, results, failed)
    return results
