"""`hdee run`: every stage of the method into one run directory.

    prepare -> [discover] -> seeds -> difficulty -> plan -> experts -> evaluate -> report

With `data.discover` the 'discover' stage clusters a corpus into domains cluster-00, ... (after
prepare; after seeds with seed features, which cluster in a seed's hidden states); the stages
after it read the clusters as they read any domain (`config.data.domain_names`).

With `run.repeats: N` the stages from seeds to evaluate run for every repeat k (the config's
`for_repeat(k)`, the layout's `repeat(k)`): other training seeds on the same prepared data,
each repeat's training jobs batched together so they run side by side. Prepare and report run
once; the report aggregates over repeats.

Each stage is a function of `(config, layout)` and idempotent, so running the same command
again resumes: prepared data is reused, finished jobs are skipped (`JobLayout.is_done`), an
interrupted job continues from its last checkpoint, and evaluation reuses cached
log-probabilities. What the stages hand each other are the typed records of `hdee.records`.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from hdee.atomic import read_json, write_json
from hdee.config import STAGES, ExperimentConfig, TrainingConfig, UsageError
from hdee.console import print_table, section, status, stderr_console
from hdee.console import progress as progress_bar
from hdee.layout import RunLayout
from hdee.plan import PlanError, build_plan, check_plannable, seed_sizes
from hdee.records import DifficultyRecord, DiscoveryRecord, JobResult, Plan, PlannedJob
from hdee.rundir import RunError, run_lock, save_resolved_config
from hdee.runners.base import JobTask, runner_for

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
    for name in config.data.corpus_names:
        path = layout.manifest(name, "train")
        if path.is_file():
            hashes[name] = read_json(path)["content_hash"]
    return hashes


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
        init_from=str(layout.job(job.init_from).final) if job.init_from else None,
        train_tokens=str(layout.tokens(job.domain, "train")),
        validation={job.domain: str(layout.tokens(job.domain, "validation"))},
        seq_len=config.data.seq_len,
        seed=config.training_seed,
        training=base.model_copy(update={"steps": job.steps}),
        output_dir=str(layout.job(job.job_id).root),
    )
    path = layout.job(job.job_id).spec
    write_json(path, spec.model_dump(mode="json"))
    return path


def job_tasks(config: ExperimentConfig, layout: RunLayout, jobs: list[PlannedJob]) -> list[JobTask]:
    """Write the spec of each job and return the runner's tasks (parents before children)."""
    vocab_size, eos = prepared_vocab(layout)
    tasks = []
    job_ids = {job.job_id for job in jobs}
    for job in jobs:
        spec_path = write_job_spec(config, layout, job, vocab_size, eos)
        # Dependencies outside this batch (a seed, for the first expert) are already finished.
        tasks.append(JobTask(job.job_id, spec_path, [d for d in job.depends_on if d in job_ids]))
    return tasks


def run_training_jobs(
    config: ExperimentConfig,
    layout: RunLayout,
    jobs: list[PlannedJob],
    console: Console,
    label: str,
    progress: bool = False,
) -> dict[str, JobResult]:
    return run_job_tasks(config, layout, job_tasks(config, layout, jobs), console, label, progress)


def run_job_tasks(
    config: ExperimentConfig,
    layout: RunLayout,
    tasks: list[JobTask],
    console: Console,
    label: str,
    progress: bool = False,
) -> dict[str, JobResult]:
    """Run the tasks with the config's runner (jobs live in the run's shared jobs/)."""
    done = sum(layout.job(task.job_id).is_done() for task in tasks)
    status(f"[bold]{label}[/]: {len(tasks)} job(s), {done} already finished", console)
    started: dict[str, float] = {}
    finished = [done]
    # The bar counts finished jobs (ETA from their pace); an in-process job's own bar shows
    # below it. Start and done lines stay in the scrollback (and in a log without a terminal).
    with progress_bar(
        label, total=len(tasks), completed=done, unit="jobs", enabled=progress
    ) as bar:

        def on_start(job_id: str) -> None:
            started[job_id] = time.time()
            if not layout.job(job_id).is_done():
                status(f"  start  {job_id}", console)

        def on_done(job_id: str, result: JobResult) -> None:
            seconds = time.time() - started.get(job_id, time.time())
            if seconds > 0.5:  # a job that only returned its stored result is not news
                finished[0] += 1
                vals = ", ".join(
                    f"{name} ppl {score.perplexity:.2f}"
                    for name, score in result.validation.items()
                )
                status(
                    f"  done   [{finished[0]}/{len(tasks)}] {job_id} in {seconds:.0f}s ({vals})",
                    console,
                )
                bar.update(finished[0])

        return runner_for(config.runner).run(tasks, on_start, on_done, progress)


def write_stage_specs(
    config: ExperimentConfig, layout: RunLayout, stage: str
) -> list[tuple[PlannedJob, Path]]:
    """Write the spec of every job of a training stage ('seeds' or 'experts'), parents first,
    for running them outside `hdee run` (an external scheduler, see docs/scaling.md). With
    repeats, those of repeat `run.repeat`."""
    layout = layout.repeat(config.run.repeat)
    if stage not in TRAINING_STAGES:
        raise RunError(f"unknown training stage {stage!r}: expected 'seeds' or 'experts'")
    jobs = sorted(stage_jobs(stage, config, layout), key=lambda job: job.iteration or 0)
    vocab_size, eos = prepared_vocab(layout)
    return [(job, write_job_spec(config, layout, job, vocab_size, eos)) for job in jobs]


def current_classes(
    layout: RunLayout, config: ExperimentConfig | None = None
) -> dict[str, str] | None:
    """The difficulty classes, once the 'difficulty' stage has written them. With `config`,
    classes it no longer fits (other domains, held-out list or difficulty settings) are a
    PlanError naming the file and the command that measures them again."""
    from hdee.difficulty import record_conflict

    path = layout.difficulty_record
    if not path.is_file():
        return None
    record = DifficultyRecord.read(path)
    conflict = record_conflict(record, config, seed_sizes(config)) if config else None
    if conflict:
        raise PlanError(
            f"{path}: {conflict}. `hdee run CONFIG` measures the classes again and plans from "
            "them (what is already prepared or trained is kept)"
        )
    return record.classes


def make_plan(config: ExperimentConfig, layout: RunLayout, with_classes: bool = True) -> Plan:
    """The plan with everything known so far: the classes once the seeds have ranked the
    domains (checked against the config), or none (`with_classes=False`, for the seeds and
    the difficulty stage: seed jobs never depend on the classes, and stale classes must not
    stop the stage that measures them again)."""
    vocab_size, _ = prepared_vocab(layout)
    return build_plan(
        config,
        vocab_size,
        classes=current_classes(layout, config) if with_classes else None,
        manifests=training_manifests(config, layout),
    )


# ----------------------------------------------------------------------------------------------
# The stages


def stage_prepare(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    from hdee.data.prepare import prepare_data
    from hdee.show import print_prepared

    summary = prepare_data(config, layout, progress=progress)
    statuses = {name: entry["status"] for name, entry in summary["corpora"].items()}
    print_prepared(config, layout, statuses, console)


TRAINING_STAGES = ("seeds", "experts")


def stage_jobs(stage: str, config: ExperimentConfig, layout: RunLayout) -> list[PlannedJob]:
    """The jobs a training stage trains: the seeds of the current plan, or the experts of
    plan.json (written by the 'plan' stage)."""
    if stage == "seeds":
        return make_plan(config, layout, with_classes=False).seed_jobs()
    return Plan.read(layout.plan).expert_jobs()


def run_training_stage(
    stage: str,
    repeats: list[tuple[ExperimentConfig, RunLayout]],
    console: Console,
    progress: bool,
) -> dict[str, JobResult]:
    """The jobs of a training stage for every repeat, as one batch: repeats train side by side
    when the runner has room. Job ids include the training seed, so no two repeats share one;
    a job listed twice would still run once."""
    tasks: dict[str, JobTask] = {}
    for config, layout in repeats:
        for task in job_tasks(config, layout, stage_jobs(stage, config, layout)):
            tasks.setdefault(task.job_id, task)
    config, layout = repeats[0]
    label = stage if len(repeats) == 1 else f"{stage} ({len(repeats)} repeats)"
    return run_job_tasks(config, layout, list(tasks.values()), console, label, progress)


def stage_seeds(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    run_training_stage("seeds", [(config, layout)], console, progress)


def stage_discover(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    from hdee.discover import print_discovery

    print_discovery(discovered(config, layout, console, progress), console)


def discovered(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> DiscoveryRecord:
    """The discovery record of data.discover, discovering the clusters where they are missing
    or out of date (hdee.discover)."""
    from hdee.discover import discover_domains

    seed_dir = seed_job = None
    if config.data.discover is not None and config.data.discover.features == "seed":
        seed_job = smallest_seed(config, layout)
        seed_dir = layout.job(seed_job).final
    return discover_domains(config, layout, seed_dir, seed_job, progress, console)


def run_discovery(
    config: ExperimentConfig, progress: bool = True, console: Console | None = None
) -> DiscoveryRecord:
    """`hdee discover`: the stages before discovery (prepare; the seeds for seed features),
    then discovery itself; returns the record instead of printing it."""
    console = console or stderr_console()
    config = config.for_repeat(0)  # the run's own seeds, as `hdee run` trains them
    order = stage_order(config)
    run_experiment(
        config, until=order[order.index("discover") - 1], progress=progress, console=console
    )
    layout = RunLayout.of(config.run_dir)
    with run_lock(layout, "hdee discover"):
        section("discover", console)
        return discovered(config, layout, console, progress)


def smallest_seed(config: ExperimentConfig, layout: RunLayout) -> str:
    """The job id of the trained seed with the narrowest FFN (seed features cluster in its
    hidden states: the cheapest seed to run over every document)."""
    from hdee.shapes import model_shapes

    shapes = model_shapes(config.model)
    seeds = make_plan(config, layout).seeds
    size = min(seeds, key=lambda s: (shapes[s].intermediate_size, s))
    if not layout.job(seeds[size]).is_done():
        raise RunError(
            f"data.discover.features 'seed' clusters in seed {size}'s hidden states, and it is "
            "not trained yet: run the 'seeds' stage first"
        )
    return seeds[size]


def require_discovery(config: ExperimentConfig, layout: RunLayout) -> None:
    """Stages after discovery read the clusters: stop with the command to run when the record
    is missing, from another hdee version, or of other clusters."""
    from hdee.records import DiscoveryRecord

    if config.data.discover is None:
        return
    record = DiscoveryRecord.read(layout.discovery_record)  # RecordError names the file
    if list(record.clusters) != config.data.discover.domain_names:
        raise RunError(
            f"{layout.discovery_record} holds clusters {list(record.clusters)}, the config asks "
            f"for {config.data.discover.clusters}: run the 'discover' stage (`hdee discover "
            "CONFIG`) again"
        )


def stage_difficulty(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    from hdee.difficulty import measure_difficulty

    plan = make_plan(config, layout, with_classes=False)
    missing = [size for size, job_id in plan.seeds.items() if not layout.job(job_id).is_done()]
    if missing:
        raise RunError(f"seed(s) {missing} are not trained yet: run the 'seeds' stage first")
    seed_dirs = {size: layout.job(job_id).final for size, job_id in plan.seeds.items()}
    record = measure_difficulty(config, layout, seed_dirs)
    rows = [
        [
            f"{record.perplexity[domain]:.2f}",
            domain,
            record.classes.get(domain) or f"held-out ({record.held_out_classes[domain]})",
        ]
        for domain in record.ranking
    ]
    print_table(
        ["perplexity", "domain", "class"],
        rows,
        title="difficulty (seed validation perplexity)",
        right={"perplexity"},
        console=console,
    )


def stage_plan(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    if current_classes(layout) is None and not isinstance(config.plan.schedule, dict):
        raise RunError("difficulty classes are missing: run the 'difficulty' stage first")
    plan = make_plan(config, layout)
    plan.write(layout.plan)
    from hdee.show import print_plan

    print_plan(plan, console, layout)


def stage_experts(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    run_training_stage("experts", [(config, layout)], console, progress)


def stage_evaluate(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    from hdee.evaluate import evaluate_run

    evaluate_run(config, layout, progress=progress)


def stage_report(
    config: ExperimentConfig, layout: RunLayout, console: Console, progress: bool
) -> None:
    from hdee.report import write_report

    path = write_report(config, layout)
    status(f"[bold]report[/]: {path}", console)


STAGE_FUNCTIONS = {
    "prepare": stage_prepare,
    "discover": stage_discover,
    "seeds": stage_seeds,
    "difficulty": stage_difficulty,
    "plan": stage_plan,
    "experts": stage_experts,
    "evaluate": stage_evaluate,
    "report": stage_report,
}


def stage_order(config: ExperimentConfig | None = None) -> list[str]:
    """The stages of a run, in order: 'discover' only with data.discover, right after prepare
    for tf-idf features and after the seeds for seed features (they need a trained seed)."""
    discover = config.data.discover if config is not None else None
    order = [stage for stage in STAGES if stage != "discover"]
    if discover is not None:
        order.insert(
            order.index("seeds" if discover.features == "tfidf" else "difficulty"), "discover"
        )
    return order


def select_stages(
    start: str | None = None, until: str | None = None, config: ExperimentConfig | None = None
) -> list[str]:
    order = stage_order(config)
    for name in (start, until):
        if name == "discover" and name not in order:
            raise UsageError(
                "the 'discover' stage needs data.discover in the config (docs/discovery.md)"
            )
        if name is not None and name not in order:
            raise UsageError(f"unknown stage {name!r}; stages are {', '.join(order)}")
    first = order.index(start) if start else 0
    last = order.index(until) if until else len(order) - 1
    if first > last:
        raise UsageError(f"--from {start} comes after --until {until}")
    return order[first : last + 1]


def run_experiment(
    config: ExperimentConfig,
    start: str | None = None,
    until: str | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> RunLayout:
    """Run (or resume) the stages from `start` to `until` inclusive."""
    console = console or stderr_console()
    config = config.for_repeat(0)  # the run's own config; repeats are views of it
    layout = RunLayout.of(config.run_dir)
    stages = select_stages(start, until, config)
    # A config the planner will refuse is refused now, not after the seeds have trained.
    known_vocab = (
        prepared_vocab(layout)[0] if (layout.tokenizer / "tokenizer.json").is_file() else None
    )
    check_plannable(config, known_vocab)
    repeats = repeat_views(config, layout)
    with run_lock(layout):
        save_resolved_config(config, layout)
        for stage in stages:
            began = time.time()
            section(stage, console)
            if stage in AFTER_DISCOVERY:
                require_discovery(config, layout)
            if stage in RUN_ONCE_STAGES or len(repeats) == 1:
                STAGE_FUNCTIONS[stage](config, layout, console, progress)
            elif stage in TRAINING_STAGES:
                run_training_stage(stage, repeats, console, progress)
            else:
                for index, (repeat_config, repeat_layout) in enumerate(repeats):
                    status(f"[bold]repeat {index}[/] (seed {repeat_config.training_seed})", console)
                    STAGE_FUNCTIONS[stage](repeat_config, repeat_layout, console, progress)
            status(f"[dim]{stage} took {time.time() - began:.1f}s[/]", console)
    return layout


# Prepared data (discovered clusters too) is shared by every repeat; the report covers them all.
RUN_ONCE_STAGES = ("prepare", "discover", "report")
# The stages that read the domains' prepared data (the clusters, with data.discover).
AFTER_DISCOVERY = ("difficulty", "plan", "experts", "evaluate")


def repeat_views(
    config: ExperimentConfig, layout: RunLayout
) -> list[tuple[ExperimentConfig, RunLayout]]:
    """(config, layout) of every repeat of the run, repeat 0 (the run directory) first."""
    return [(config.for_repeat(k), layout.repeat(k)) for k in range(config.run.repeats)]
