"""The planner: lanes, iterations, configurations and compute budgets -> a job graph.

Pure arithmetic over the config, the difficulty classes and the model shapes: nothing here
trains or reads token files, so `hdee plan` can print everything before anything runs
(show.py prints it).

Budgets. A configuration trains, in each of `iterations` BTM iterations, one expert per lane
(difficulty class). Its cost is the sum over those expert jobs of

    proxy:  |FFN| x steps                                  (the paper's constraint)
    flops:  training FLOPs per token x tokens per step x steps   (shapes.py's count)

The seeds (one per size) are reported beside the expert budget, not hidden.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any

from hdee.config import DIFFICULTY_CLASSES, Configuration, ExperimentConfig, stable_hash
from hdee.records import Budget, Plan, PlannedConfiguration, PlannedJob
from hdee.shapes import Architecture, ModelShape, model_shapes, training_flops_per_token


class PlanError(ValueError):
    """The config cannot be planned as asked (the message says why and what to change)."""


# ----------------------------------------------------------------------------------------------
# Budgets (pure)


def job_budget(shape: ModelShape, steps: int, flops_per_step: float) -> Budget:
    return Budget(proxy=float(shape.intermediate_size * steps), flops=flops_per_step * steps)


def configuration_budget(
    configuration: Configuration,
    lanes: list[str],
    iterations: int,
    shapes: dict[str, ModelShape],
    flops_per_step: dict[str, float],
) -> Budget:
    """Sum over lanes and iterations of each expert job's cost."""
    proxy = flops = 0.0
    for lane in lanes:
        size = configuration.sizes[lane]
        budget = job_budget(shapes[size], configuration.steps[lane], flops_per_step[size])
        proxy += budget.proxy * iterations
        flops += budget.flops * iterations
    return Budget(proxy=proxy, flops=flops)


def equalise_steps(
    steps: dict[str, int], cost_per_step: dict[str, float], target: float
) -> dict[str, int]:
    """Scale every lane's steps by one factor so that sum(cost x steps) hits `target`, then
    nudge single lanes by +-1 step while that brings the total closer (integers rarely allow an
    exact match; the remaining gap is at most about one step of the cheapest lane)."""
    current = sum(cost_per_step[lane] * s for lane, s in steps.items())
    factor = target / current
    new = {lane: max(1, round(s * factor)) for lane, s in steps.items()}

    def gap(candidate: dict[str, int]) -> float:
        return abs(target - sum(cost_per_step[lane] * s for lane, s in candidate.items()))

    improved = True
    while improved:
        improved = False
        for lane in sorted(new, key=lambda name: cost_per_step[name]):
            for delta in (1, -1):
                trial = {**new, lane: new[lane] + delta}
                if trial[lane] >= 1 and gap(trial) < gap(new) - 1e-9:
                    new, improved = trial, True
    return new


# ----------------------------------------------------------------------------------------------
# Lanes and schedule (pure)


def auto_schedule(
    classes: dict[str, str], lanes: list[str], iterations: int, seed: int
) -> dict[str, list[str]]:
    """Every iteration takes the next unused domain of each class, in a seeded order."""
    schedule: dict[str, list[str]] = {}
    for lane in lanes:
        candidates = sorted(domain for domain, cls in classes.items() if cls == lane)
        random.Random(f"{seed}:{lane}").shuffle(candidates)
        if len(candidates) < iterations:
            raise PlanError(
                f"class {lane!r} has {len(candidates)} trainable domain(s) {candidates} but "
                f"plan.iterations is {iterations}: add domains, lower plan.iterations, or give "
                "plan.schedule explicitly"
            )
        schedule[lane] = candidates[:iterations]
    return schedule


def placeholder_schedule(lanes: list[str], iterations: int) -> dict[str, list[str]]:
    """Domains are chosen after the seeds rank them; until then name the slots."""
    return {lane: [f"<{lane} #{k + 1}>" for k in range(iterations)] for lane in lanes}


# ----------------------------------------------------------------------------------------------
# Job identity


def corpus_fingerprints(
    config: ExperimentConfig, manifests: dict[str, str] | None
) -> dict[str, str]:
    """What a job's data is: the content hash of the prepared tokens where known, else a hash
    of everything `hdee prepare` would read (so a plan made before preparing is stable)."""
    prepare_inputs = {
        "tokenizer": config.data.tokenizer.model_dump(mode="json"),
        "split": config.data.split.model_dump(mode="json"),
        "seed": config.seed,
    }
    configured = {c.name: c for c in [config.data.general, *config.data.domains]}
    fingerprints = {}
    for name in config.data.corpus_names:
        if manifests and name in manifests:
            fingerprints[name] = manifests[name]
        elif name in configured:
            fingerprints[name] = stable_hash(
                {"corpus": configured[name].model_dump(mode="json"), **prepare_inputs}
            )
        else:  # a cluster data.discover will find
            assert config.data.discover is not None
            discover = config.data.discover.model_dump(mode="json")
            fingerprints[name] = stable_hash(
                {"discover": discover, "cluster": name, **prepare_inputs}
            )
    return fingerprints


def _job_id(kind: str, size: str, label: str, identity: dict[str, Any]) -> str:
    return f"{kind}-{size}-{label}-{stable_hash(identity, 10)}"


# ----------------------------------------------------------------------------------------------
# The plan


def lanes_of(config: ExperimentConfig) -> list[str]:
    if isinstance(config.plan.schedule, dict):
        return [cls for cls in DIFFICULTY_CLASSES if cls in config.plan.schedule]
    return list(DIFFICULTY_CLASSES)


def seed_sizes(config: ExperimentConfig) -> list[str]:
    used = {size for c in config.plan.configurations for size in c.sizes.values()}
    if config.seeds.sizes:
        used |= set(config.seeds.sizes)
    if config.difficulty.seed_size:
        used.add(config.difficulty.seed_size)
    return sorted(used)


def tokens_per_step(config: ExperimentConfig, training) -> int:
    world = max(1, config.runner.gpus_per_job)
    return training.batch_size * training.grad_accum * config.data.seq_len * world


def _check_configurations(config: ExperimentConfig, lanes: list[str], shapes: dict) -> None:
    for index, c in enumerate(config.plan.configurations):
        where = f"plan.configurations.{index}"
        for lane in lanes:
            if lane not in c.sizes or lane not in c.steps:
                raise PlanError(
                    f"{where} ({c.name!r}): no size/steps for lane {lane!r} "
                    f"(needs sizes and steps for {lanes})"
                )
            if c.sizes[lane] not in shapes:
                raise PlanError(
                    f"{where}.sizes.{lane} ({c.name!r}): unknown size {c.sizes[lane]!r}, the "
                    f"model defines {sorted(shapes)}"
                )


def _check_seed_sizes(config: ExperimentConfig, shapes: dict) -> None:
    for index, size in enumerate(config.seeds.sizes or []):
        if size not in shapes:
            raise PlanError(
                f"seeds.sizes.{index}: unknown size {size!r}, the model defines {sorted(shapes)}"
            )
    if config.difficulty.seed_size and config.difficulty.seed_size not in shapes:
        raise PlanError(
            f"difficulty.seed_size: unknown size {config.difficulty.seed_size!r}, the model "
            f"defines {sorted(shapes)}"
        )


def tercile_class_sizes(domains: int) -> dict[str, int]:
    """How many domains each class gets when `domains` are split into terciles: as
    difficulty.tercile_groups (numpy.array_split) does, the first classes take the remainder.
    Here without numpy or torch, so `hdee plan` stays instant."""
    base, extra = divmod(domains, len(DIFFICULTY_CLASSES))
    return {cls: base + (1 if k < extra else 0) for k, cls in enumerate(DIFFICULTY_CLASSES)}


def _check_class_capacity(config: ExperimentConfig) -> None:
    """Every lane needs `plan.iterations` distinct domains of its class. With an explicit
    schedule the config has checked that already; with 'auto' it is decidable before the seeds
    run for the 'tercile' and 'fixed' methods (class sizes follow from the domain count or the
    fixed classes) and, as a lower bound, for 'thresholds'."""
    if isinstance(config.plan.schedule, dict):
        return
    iterations = config.plan.iterations
    trainable = config.trainable_domains
    lanes = lanes_of(config)
    remedy = "add domains to data.domains, hold fewer out (plan.held_out), or lower plan.iterations"
    if config.data.discover is not None:
        remedy = "discover more clusters (data.discover.clusters), " + remedy
    method = config.difficulty.method
    if method == "fixed":
        fixed = config.difficulty.fixed or {}
        unclassified = [d for d in trainable if d not in fixed]
        if unclassified:
            raise PlanError(
                f"difficulty.fixed: no class for trainable domain(s) {unclassified} (every "
                "domain not in plan.held_out needs one)"
            )
        counts = {lane: sum(fixed[d] == lane for d in trainable) for lane in lanes}
        how = "difficulty.fixed gives"
    elif method == "tercile":
        counts = tercile_class_sizes(len(trainable))
        how = f"difficulty.method 'tercile' splits the {len(trainable)} trainable domains into"
    else:
        needed = iterations * len(lanes)
        if len(trainable) < needed:
            raise PlanError(
                f"plan.iterations: {iterations} iterations of {len(lanes)} lanes need at least "
                f"{needed} trainable domains, the config has {len(trainable)} (data.domains "
                f"minus plan.held_out); {remedy}"
            )
        return
    short = {lane: counts[lane] for lane in lanes if counts[lane] < iterations}
    if short:
        listing = ", ".join(f"{lane} {count}" for lane, count in counts.items())
        raise PlanError(
            f"plan.iterations: {iterations} iterations need {iterations} domains per class, but "
            f"{how} classes of {listing}: too few for {sorted(short)}; {remedy}"
        )


def check_plannable(config: ExperimentConfig, vocab_size: int | None = None) -> None:
    """Every check the planner can decide from the config alone, so `hdee plan` and `hdee run`
    refuse a config before any stage runs rather than after hours of seed training: sizes that
    exist, classes that can hold `plan.iterations` domains, equal budgets. Raises PlanError
    naming the key.

    `vocab_size` is the tokenizer's size where known; without it a BPE's configured size is
    used. A pretrained tokenizer's size is not in the config: then budgets measured in FLOPs are
    not compared here (the 'seeds' stage plans with the prepared tokenizer and compares them).
    """
    shapes = model_shapes(config.model)
    _check_configurations(config, lanes_of(config), shapes)
    _check_seed_sizes(config, shapes)
    _check_class_capacity(config)
    if vocab_size is None and config.data.tokenizer.kind == "bpe":
        vocab_size = config.data.tokenizer.vocab_size
    if vocab_size is None:
        vocab_size = config.data.tokenizer.vocab_size  # only the unchecked FLOP counts use it
        if "flops" in (config.plan.budget_measure, config.plan.equalise):
            config = config.model_copy(
                update={"plan": config.plan.model_copy(update={"allow_unequal_budgets": True})}
            )
    build_plan(config, vocab_size)


def build_plan(
    config: ExperimentConfig,
    vocab_size: int,
    classes: dict[str, str] | None = None,
    manifests: dict[str, str] | None = None,
) -> Plan:
    """Plan every job of the experiment.

    `classes` (domain -> difficulty class) comes from difficulty.py; without it (and without an
    explicit schedule) the plan is provisional: budgets and seeds are final, expert domains are
    placeholders. `manifests` maps corpus name -> content hash of its prepared training tokens.
    """
    lanes = lanes_of(config)
    shapes = model_shapes(config.model)
    _check_configurations(config, lanes, shapes)
    _check_seed_sizes(config, shapes)
    ids = _JobIdentity(config, shapes, vocab_size, corpus_fingerprints(config, manifests))
    schedule, classes, provisional = _schedule(config, lanes, classes)
    trained = [d for lane in lanes for d in schedule[lane]]
    seeds, jobs, seed_budget = _plan_seeds(config, ids)
    measure, configurations = _planned_configurations(config, lanes, ids)
    plan = Plan(
        lanes=lanes,
        classes=classes,
        schedule=schedule,
        trained_domains=trained,
        held_out_domains=[d for d in config.data.domain_names if d not in trained],
        seeds=seeds,
        jobs=jobs,
        configurations=configurations,
        seed_budget=seed_budget,
        baseline=config.plan.baseline,
        budget_measure=measure,
        provisional=provisional,
    )
    _check_budgets(config, plan, measure)
    _plan_experts(config, plan, ids)
    return plan


class _JobIdentity:
    """What determines a job's weights (its id hashes it) and the FLOPs of one of its steps."""

    def __init__(
        self,
        config: ExperimentConfig,
        shapes: dict[str, Any],
        vocab_size: int,
        fingerprints: dict[str, str],
    ) -> None:
        self.config, self.shapes, self.vocab_size = config, shapes, vocab_size
        self.fingerprints = fingerprints
        self.ranks = max(1, config.runner.gpus_per_job)  # DDP ranks: each adds a batch to a step

    def flops_per_step(self, size: str, training: Any) -> float:
        architecture = Architecture.of(self.shapes[size], self.vocab_size)
        flops = training_flops_per_token(architecture, self.config.data.seq_len)
        return flops * tokens_per_step(self.config, training)

    def of(self, kind: str, size: str, training: Any, data: str, **more: Any) -> dict[str, Any]:
        return {
            "kind": kind,
            "shape": asdict(self.shapes[size]),
            "vocab": self.vocab_size,
            "seq_len": self.config.data.seq_len,
            "training": training.weight_settings(),
            "ranks": self.ranks,
            "data": data,
            **more,
            "seed": self.config.training_seed,
        }


def _schedule(
    config: ExperimentConfig, lanes: list[str], classes: dict[str, str] | None
) -> tuple[dict[str, list[str]], dict[str, str] | None, bool]:
    """(schedule, classes, provisional): explicit, or from classes, or placeholders until the
    seeds have ranked the domains."""
    iterations = config.plan.iterations
    if isinstance(config.plan.schedule, dict):
        schedule = {lane: list(config.plan.schedule[lane]) for lane in lanes}
        return schedule, classes or {d: lane for lane, ds in schedule.items() for d in ds}, False
    if classes is not None:
        trainable = {d: c for d, c in classes.items() if d in config.trainable_domains}
        return auto_schedule(trainable, lanes, iterations, config.seed), classes, False
    return placeholder_schedule(lanes, iterations), classes, True


def _plan_seeds(
    config: ExperimentConfig, ids: _JobIdentity
) -> tuple[dict[str, str], dict[str, PlannedJob], Budget]:
    """One seed per size any configuration uses: (size -> job id, the jobs, their budget)."""
    seeds: dict[str, str] = {}
    jobs: dict[str, PlannedJob] = {}
    training = config.seeds.training
    general = config.data.general.name
    budget = Budget(proxy=0.0, flops=0.0)
    for size in seed_sizes(config):
        identity = ids.of("seed", size, training, ids.fingerprints[general])
        job_id = _job_id("seed", size, general, identity)
        seeds[size] = job_id
        jobs[job_id] = PlannedJob(
            job_id=job_id, kind="seed", size=size, steps=training.steps, domain=general
        )
        budget += job_budget(ids.shapes[size], training.steps, ids.flops_per_step(size, training))
    return seeds, jobs, budget


def _planned_configurations(
    config: ExperimentConfig, lanes: list[str], ids: _JobIdentity
) -> tuple[str, dict[str, PlannedConfiguration]]:
    """(the budget measure, every configuration with its steps and budget), steps equalised
    against the baseline's budget if plan.equalise asks."""
    iterations, shapes = config.plan.iterations, ids.shapes
    expert_flops = {size: ids.flops_per_step(size, config.experts.training) for size in shapes}
    measure = config.plan.budget_measure
    planned_steps = {c.name: dict(c.steps) for c in config.plan.configurations}
    by_name = {c.name: c for c in config.plan.configurations}

    def budget_of(name: str) -> Budget:
        c = by_name[name].model_copy(update={"steps": planned_steps[name]})
        return configuration_budget(c, lanes, iterations, shapes, expert_flops)

    if config.plan.equalise != "none":
        measure = config.plan.equalise
        target = budget_of(config.plan.baseline).measure(measure)
        for name, c in by_name.items():
            if name == config.plan.baseline:
                continue
            cost = {
                lane: (
                    shapes[c.sizes[lane]].intermediate_size
                    if measure == "proxy"
                    else expert_flops[c.sizes[lane]]
                )
                * iterations
                for lane in lanes
            }
            planned_steps[name] = equalise_steps(
                {lane: planned_steps[name][lane] for lane in lanes}, cost, target
            )
    return measure, {
        name: PlannedConfiguration(
            name=name,
            sizes={lane: c.sizes[lane] for lane in lanes},
            steps={lane: planned_steps[name][lane] for lane in lanes},
            budget=budget_of(name),
        )
        for name, c in by_name.items()
    }


def _check_budgets(config: ExperimentConfig, plan: Plan, measure: str) -> None:
    tolerance = config.plan.budget_tolerance
    unequal = {
        name: plan.relative_budget_gap(name, measure)
        for name in plan.configurations
        if abs(plan.relative_budget_gap(name, measure)) > tolerance
    }
    if unequal and not config.plan.allow_unequal_budgets:
        listing = ", ".join(f"{name} {gap:+.2%}" for name, gap in unequal.items())
        raise PlanError(
            f"configurations differ from the baseline {config.plan.baseline!r} by more than "
            f"plan.budget_tolerance={tolerance:g} in the {measure} budget: {listing}. Set "
            "plan.equalise to 'proxy' or 'flops' to adjust steps, or "
            "plan.allow_unequal_budgets: true to run them anyway"
        )


def _plan_experts(config: ExperimentConfig, plan: Plan, ids: _JobIdentity) -> None:
    """Experts: every lane of every configuration, iteration by iteration, branching from the
    lane's own previous expert (iteration 1: the seed of the lane's size). Identical jobs (same
    size, steps, domain and parent) get the same id and so run once."""
    for c in plan.configurations.values():
        previous: dict[str, str] = {lane: plan.seeds[c.sizes[lane]] for lane in plan.lanes}
        for k in range(config.plan.iterations):
            ensemble: dict[str, str] = {}
            for lane in plan.lanes:
                size, steps, domain = c.sizes[lane], c.steps[lane], plan.schedule[lane][k]
                training = config.experts.training.model_copy(update={"steps": steps})
                data = ids.fingerprints.get(domain, domain)
                identity = ids.of("expert", size, training, data, init_from=previous[lane])
                job_id = _job_id("expert", size, f"{domain}-{steps}", identity)
                plan.jobs.setdefault(
                    job_id,
                    PlannedJob(
                        job_id=job_id,
                        kind="expert",
                        size=size,
                        steps=steps,
                        domain=domain,
                        lane=lane,
                        iteration=k + 1,
                        init_from=previous[lane],
                    ),
                )
                ensemble[lane] = previous[lane] = job_id
            c.ensembles.append(ensemble)
