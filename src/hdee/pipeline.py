"""`hdee run`: every stage of the method into one run directory.

    prepare -> seeds -> difficulty -> plan -> experts -> evaluate -> report

Each stage is idempotent, so running the same command again resumes: prepared data is reused,
finished jobs are skipped (a job is finished when its result.json exists), an interrupted job
continues from its last checkpoint, and evaluation reuses cached log-probabilities.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from hdee.atomic import read_json, write_json
from hdee.config import STAGES, ExperimentConfig, TrainingConfig
from hdee.layout import RunLayout
from hdee.plan import (
    Plan,
    PlannedJob,
    build_plan,
    check_plannable,
    plan_from_json,
    print_plan,
    trainable_domains,
)
from hdee.rundir import RunError, run_lock, save_resolved_config
from hdee.runners.local import JobTask, run_jobs

# ----------------------------------------------------------------------------------------------
# What the stages share


def prepared_vocab(layout: RunLayout) -> tuple[int, int | None]:
    """Vocabulary size and EOS id of the prepared tokenizer."""
    from hdee.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(layout.tokenizer)
    return len(tokenizer), tokenizer.eos_token_id


def training_manifests(config: ExperimentConfig, layout: RunLayout) -> dict[str, str]:
    """Content hash of each corpus's training tokens (identifies a job's data)."""
    hashes = {}
    for corpus in [config.data.general, *config.data.domains]:
        path = layout.manifest(corpus.name, "train")
        if path.is_file():
            hashes[corpus.name] = read_json(path)["content_hash"]
    return hashes


def job_model_dir(layout: RunLayout, job_id: str) -> Path:
    return layout.job(job_id) / "final"


def job_is_done(layout: RunLayout, job_id: str) -> bool:
    return (layout.job(job_id) / "result.json").is_file()


def write_job_spec(
    config: ExperimentConfig,
    layout: RunLayout,
    job: PlannedJob,
    vocab_size: int,
    eos_token_id: int | None,
) -> Path:
    """The TrainSpec of a planned job, written into its directory."""
    from hdee.model import llama_config
    from hdee.shapes import model_shapes
    from hdee.train import TrainSpec

    base: TrainingConfig = config.seeds.training if job.kind == "seed" else config.experts.training
    shape = model_shapes(config.model)[job.size]
    spec = TrainSpec(
        kind=job.kind,
        model=llama_config(
            shape, vocab_size=vocab_size, seq_len=config.data.seq_len, eos_token_id=eos_token_id
        ).to_dict(),
        init_from=str(job_model_dir(layout, job.init_from)) if job.init_from else None,
        train_tokens=str(layout.tokens(job.domain, "train")),
        validation={job.domain: str(layout.tokens(job.domain, "validation"))},
        seq_len=config.data.seq_len,
        seed=config.seed,
        training=base.model_copy(update={"steps": job.steps}),
        output_dir=str(layout.job(job.job_id)),
    )
    path = layout.job(job.job_id) / "spec.json"
    write_json(path, spec.model_dump(mode="json"))
    return path


def run_training_jobs(
    config: ExperimentConfig,
    layout: RunLayout,
    jobs: list[PlannedJob],
    console: Console,
    label: str,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    vocab_size, eos = prepared_vocab(layout)
    tasks = []
    job_ids = {job.job_id for job in jobs}
    for job in jobs:
        spec_path = write_job_spec(config, layout, job, vocab_size, eos)
        # Dependencies outside this batch (a seed, for the first expert) are already finished.
        tasks.append(JobTask(job.job_id, spec_path, [d for d in job.depends_on if d in job_ids]))
    done = sum(job_is_done(layout, job.job_id) for job in jobs)
    console.print(f"[bold]{label}[/]: {len(jobs)} job(s), {done} already finished")
    started: dict[str, float] = {}
    finished = [done]

    def on_start(job_id: str) -> None:
        started[job_id] = time.time()
        if not job_is_done(layout, job_id):
            console.print(f"  start  {job_id}")

    def on_done(job_id: str, result: dict[str, Any]) -> None:
        seconds = time.time() - started.get(job_id, time.time())
        if seconds > 0.5:  # a job that only returned its stored result is not news
            finished[0] += 1
            vals = ", ".join(
                f"{name} ppl {v['perplexity']:.2f}"
                for name, v in (result.get("validation") or {}).items()
            )
            console.print(
                f"  done   [{finished[0]}/{len(jobs)}] {job_id} in {seconds:.0f}s ({vals})"
            )

    if config.runner.kind == "ray":
        from hdee.runners.ray_runner import run_jobs_on_ray

        return run_jobs_on_ray(
            tasks,
            address=config.runner.address,
            gpus_per_job=config.runner.gpus_per_job,
            cpus_per_job=config.runner.cpus_per_job,
            on_start=on_start,
            on_done=on_done,
        )
    return run_jobs(
        tasks,
        workers=config.runner.workers,
        gpus_per_job=config.runner.gpus_per_job,
        on_start=on_start,
        on_done=on_done,
        progress=progress,
    )


def write_stage_specs(config: ExperimentConfig, stage: str) -> list[tuple[PlannedJob, Path]]:
    """Write the spec of every job of a training stage ('seeds' or 'experts'), parents first,
    for running them outside `hdee run` (an external scheduler, see docs/scaling.md)."""
    layout = RunLayout.of(config.run_dir)
    if stage == "seeds":
        plan = make_plan(config, layout)
        jobs = [plan.jobs[job_id] for job_id in plan.seeds.values()]
    elif stage == "experts":
        jobs = sorted(load_plan(layout).expert_jobs(), key=lambda job: job.iteration or 0)
    else:
        raise RunError(f"unknown training stage {stage!r}: expected 'seeds' or 'experts'")
    vocab_size, eos = prepared_vocab(layout)
    return [(job, write_job_spec(config, layout, job, vocab_size, eos)) for job in jobs]


def load_plan(layout: RunLayout) -> Plan:
    if not layout.plan.is_file():
        raise RunError(f"{layout.plan} is missing: run the stages up to 'plan' first")
    return plan_from_json(read_json(layout.plan))


def current_classes(layout: RunLayout) -> dict[str, str] | None:
    path = layout.difficulty / "difficulty.json"
    return read_json(path)["classes"] if path.is_file() else None


def make_plan(config: ExperimentConfig, layout: RunLayout) -> Plan:
    """The plan with everything known so far (classes once the seeds have ranked domains)."""
    vocab_size, _ = prepared_vocab(layout)
    return build_plan(
        config,
        vocab_size,
        classes=current_classes(layout),
        manifests=training_manifests(config, layout),
    )


# ----------------------------------------------------------------------------------------------
# The stages


def stage_prepare(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    from hdee.data.prepare import prepare_data

    prepare_data(config, progress=progress)


def stage_seeds(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    plan = make_plan(config, layout)
    seeds = [plan.jobs[job_id] for job_id in plan.seeds.values()]
    run_training_jobs(config, layout, seeds, console, "seeds", progress)


def stage_difficulty(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    from hdee.difficulty import measure_difficulty

    plan = make_plan(config, layout)
    missing = [size for size, job_id in plan.seeds.items() if not job_is_done(layout, job_id)]
    if missing:
        raise RunError(f"seed(s) {missing} are not trained yet: run the 'seeds' stage first")
    trainable = trainable_domains(config)
    record = measure_difficulty(
        seed_dirs={size: job_model_dir(layout, job_id) for size, job_id in plan.seeds.items()},
        validation_tokens={d: layout.tokens(d, "validation") for d in config.data.domain_names},
        seq_len=config.data.seq_len,
        config=config.difficulty,
        trainable=trainable,
        held_out=[d for d in config.data.domain_names if d not in trainable],
        out_dir=layout.difficulty,
        batch_size=config.evaluation.batch_size,
        device=config.seeds.training.device,
    )
    console.print("[bold]difficulty[/] (seed validation perplexity):")
    for domain in record["ranking"]:
        cls = record["classes"].get(domain) or f"held-out ({record['held_out_classes'][domain]})"
        console.print(f"  {record['perplexity'][domain]:10.2f}  {domain:24s} {cls}")


def stage_plan(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    if current_classes(layout) is None and not isinstance(config.plan.schedule, dict):
        raise RunError("difficulty classes are missing: run the 'difficulty' stage first")
    plan = make_plan(config, layout)
    write_json(layout.plan, plan.to_json())
    print_plan(plan, console, layout)


def stage_experts(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    plan = load_plan(layout)
    run_training_jobs(config, layout, plan.expert_jobs(), console, "experts", progress)


def stage_evaluate(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    from hdee.evaluate import evaluate_run

    evaluate_run(layout.root, config, progress=progress)


def stage_report(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    from hdee.report import write_report

    path = write_report(layout.root, config)
    console.print(f"[bold]report[/]: {path}")


STAGE_FUNCTIONS = {
    "prepare": stage_prepare,
    "seeds": stage_seeds,
    "difficulty": stage_difficulty,
    "plan": stage_plan,
    "experts": stage_experts,
    "evaluate": stage_evaluate,
    "report": stage_report,
}


def select_stages(start: str | None = None, until: str | None = None) -> list[str]:
    for name in (start, until):
        if name is not None and name not in STAGES:
            raise RunError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    first = STAGES.index(start) if start else 0
    last = STAGES.index(until) if until else len(STAGES) - 1
    if first > last:
        raise RunError(f"--from {start} comes after --until {until}")
    return list(STAGES[first : last + 1])


def run_experiment(
    config: ExperimentConfig,
    start: str | None = None,
    until: str | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> RunLayout:
    """Run (or resume) the stages from `start` to `until` inclusive."""
    console = console or Console(stderr=True)
    layout = RunLayout.of(config.run_dir)
    stages = select_stages(start, until)
    # A config the planner will refuse is refused now, not after the seeds have trained.
    known_vocab = (
        prepared_vocab(layout)[0] if (layout.tokenizer / "tokenizer.json").is_file() else None
    )
    check_plannable(config, known_vocab)
    with run_lock(layout):
        save_resolved_config(config, layout)
        for stage in stages:
            began = time.time()
            console.rule(f"[bold]{stage}")
            STAGE_FUNCTIONS[stage](config, layout, console, progress)
            console.print(f"[dim]{stage} took {time.time() - began:.1f}s[/]")
    return layout
