"""The typed files of a run directory: written and read only through these models.

    plan.json                  Plan              (plan.py builds it)
    discovery/discovery.json   DiscoveryRecord   (discover.py, data.discover)
    jobs/<id>/result.json      JobResult         (train.py writes it last)
    difficulty/difficulty.json DifficultyRecord  (difficulty.py)
    evaluation/results.json    EvaluationResults (evaluate.py; schema in docs/evaluation.md)
    tasks/results.json         TasksResults      (tasks.py, `hdee tasks`)

Each file carries `format` and `version`; reading a file of another format, an older version
or with missing or wrong fields is a `RecordError` that names the file and says what to do,
never a KeyError somewhere later. Paths come from `hdee.layout`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self

from hdee.atomic import write_json
from hdee.errors import UsageError


class RecordError(ValueError):
    """A run-directory file is missing, corrupt, foreign or from another hdee version."""


class Record(BaseModel):
    """A versioned JSON file of a run directory."""

    # NaN stays NaN in the file (a cut point between empty classes is NaN, not null).
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    # Each record declares `format: Literal["hdee-..."]` and `version: Literal[N]` with those
    # values as defaults, so a record made in code always carries its own.
    MADE_BY: ClassVar[str]  # the command that writes it, for error messages
    # Older versions this hdee still reads (their files parse as this model: what changed since
    # only added optional keys). A version not here is refused with the command that rewrites it.
    ALSO_READS: ClassVar[tuple[int, ...]] = ()

    @classmethod
    def expected(cls) -> tuple[str, int]:
        return cls.model_fields["format"].default, cls.model_fields["version"].default

    def write(self, path: str | Path) -> None:
        # Optional keys that do not apply are left out (every optional field defaults to None).
        write_json(path, self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def read(cls, path: str | Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise RecordError(f"{path} is missing: run {cls.MADE_BY} first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RecordError(f"{path}: corrupt JSON ({error})") from None
        form, version = cls.expected()
        if not isinstance(data, dict) or data.get("format") != form:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise RecordError(f"{path}: not an {form} file (format {found!r})")
        if data.get("version") != version and data.get("version") not in cls.ALSO_READS:
            raise RecordError(
                f"{path}: {form} version {data.get('version')!r}, this hdee reads version "
                f"{version}; run {cls.MADE_BY} again to rewrite it"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in error.errors()
            )
            raise RecordError(f"{path}: invalid {form} file: {problems}") from None


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


# ----------------------------------------------------------------------------------------------
# plan.json


class PlannedJob(_Part):
    """One training job. Its id is a hash of everything that determines its weights."""

    job_id: str
    kind: Literal["seed", "expert"]
    size: str
    steps: int
    domain: str
    lane: str | None = None
    iteration: int | None = None
    init_from: str | None = None

    @property
    def depends_on(self) -> list[str]:
        return [self.init_from] if self.init_from else []


class Budget(_Part):
    proxy: float  # sum of |FFN| x steps (the paper's constraint)
    flops: float  # training FLOPs

    def measure(self, name: str) -> float:
        return self.proxy if name == "proxy" else self.flops

    def __add__(self, other: Budget) -> Budget:
        return Budget(proxy=self.proxy + other.proxy, flops=self.flops + other.flops)


class PlannedConfiguration(_Part):
    name: str
    sizes: dict[str, str]  # lane -> model size
    steps: dict[str, int]  # lane -> steps per iteration
    budget: Budget
    # ensembles[k] is the ensemble after iteration k + 1: lane -> expert job id (read it with
    # Plan.ensemble, which orders the lanes as the plan does).
    ensembles: list[dict[str, str]] = []


class Plan(Record):
    format: Literal["hdee-plan"] = "hdee-plan"
    version: Literal[2] = 2
    MADE_BY: ClassVar[str] = "the 'plan' stage (`hdee run CONFIG --until plan`)"

    lanes: list[str]
    classes: dict[str, str] | None = None  # domain -> class; None until the seeds ranked them
    schedule: dict[str, list[str]]  # lane -> domain of each iteration
    trained_domains: list[str]
    held_out_domains: list[str]
    seeds: dict[str, str]  # size -> seed job id
    jobs: dict[str, PlannedJob]
    configurations: dict[str, PlannedConfiguration]
    seed_budget: Budget
    baseline: str
    budget_measure: Literal["proxy", "flops"]
    provisional: bool = False  # True when classes were not known yet (domains are placeholders)

    @property
    def iterations(self) -> int:
        return len(self.schedule[self.lanes[0]]) if self.lanes else 0

    def expert_jobs(self) -> list[PlannedJob]:
        return [job for job in self.jobs.values() if job.kind == "expert"]

    def seed_jobs(self) -> list[PlannedJob]:
        return [self.jobs[job_id] for job_id in self.seeds.values()]

    def relative_budget_gap(self, name: str, measure: str | None = None) -> float:
        measure = measure or self.budget_measure
        base = self.configurations[self.baseline].budget.measure(measure)
        return self.configurations[name].budget.measure(measure) / base - 1.0

    def configuration(self, name: str) -> PlannedConfiguration:
        if name not in self.configurations:
            raise UsageError(  # a --configuration (or evaluation key) naming none: exit 2
                f"configuration {name!r} is not in the plan; choose one of "
                f"{sorted(self.configurations)}"
            )
        return self.configurations[name]

    def ensemble(self, name: str, iteration: int | None = None) -> tuple[int, dict[str, str]]:
        """(iteration, {lane: job id}) of a configuration's ensemble after `iteration`
        (1-based; default: the last), lanes in the plan's order."""
        ensembles = self.configuration(name).ensembles
        index = len(ensembles) if iteration is None else iteration
        if not 1 <= index <= len(ensembles):
            raise UsageError(f"{name!r} has iterations 1..{len(ensembles)}, not {iteration}")
        ensemble = ensembles[index - 1]
        ordered = [lane for lane in self.lanes if lane in ensemble]
        ordered += [lane for lane in ensemble if lane not in ordered]
        return index, {lane: ensemble[lane] for lane in ordered}

    def domain_kinds(self) -> dict[str, Literal["trained", "held_out"]]:
        """Domain -> "trained" | "held_out", trained first, each once."""
        kinds: dict[str, Literal["trained", "held_out"]] = {}
        for domain in self.trained_domains:
            kinds.setdefault(domain, "trained")
        for domain in self.held_out_domains:
            kinds.setdefault(domain, "held_out")
        return kinds


# ----------------------------------------------------------------------------------------------
# discovery/discovery.json (data.discover; docs/discovery.md)


class ClusterSummary(_Part):
    documents: dict[str, int]  # split -> documents of the corpus's split in this cluster
    tokens: dict[str, int]  # split -> tokens (the cluster's prepared token files)
    sample_documents: int  # sampled documents it held while fitting
    top_terms: list[str]  # tfidf: the centroid mapped back through the SVD; seed: mean tf-idf
    labels: dict[str, int] | None = None  # known label -> its documents here (data.discover.labels)


class LabelAgreement(_Part):
    source: Literal["directory", "file"]  # where the labels came from
    labels: int  # distinct labels
    purity: float  # share of documents in their cluster's majority label
    adjusted_rand_index: float
    normalized_mutual_info: float


class DiscoveryRecord(Record):
    format: Literal["hdee-discovery"] = "hdee-discovery"
    version: Literal[1] = 1
    MADE_BY: ClassVar[str] = "`hdee discover CONFIG` (the 'discover' stage of `hdee run`)"

    corpus: str
    features: Literal["tfidf", "seed"]
    seed_job: str | None = None  # seed features: the seed whose hidden states were clustered
    fingerprint: str  # what the clusters' token files were made from (their source_fingerprint)
    transform_fingerprint: str  # what the fitted transform was made from
    documents: int  # every document of the corpus
    training_documents: int
    sample_documents: int  # the fit's sample
    dimensions: int  # feature dimensions (SVD components, or the seed's hidden size)
    vocabulary: int | None = None  # tf-idf terms
    balance: float
    sample_band: list[int]  # [fewest, most] sampled documents a cluster could hold
    fit_iterations: int
    converged: bool
    corpus_spread: float  # max over clusters of |documents / equal share - 1| on the corpus
    corpus_cap: int  # the most documents of the corpus a cluster may hold
    capped_documents: int  # documents that cap moved off their nearest cluster
    clusters: dict[str, ClusterSummary]
    agreement: LabelAgreement | None = None
    seconds: dict[str, float]  # sample, fit, assign (those this run did)


# ----------------------------------------------------------------------------------------------
# jobs/<id>/result.json


class ValidationScore(_Part):
    loss: float
    perplexity: float


class JobResult(Record):
    format: Literal["hdee-job-result"] = "hdee-job-result"
    version: Literal[2] = 2
    MADE_BY: ClassVar[str] = "the job (`hdee train SPEC` or `hdee run`)"

    kind: Literal["seed", "expert"]
    steps: int
    tokens: int
    seconds: float
    final_loss: float | None = None
    validation: dict[str, ValidationScore]  # validation corpus -> score at the last step
    flops: float
    parameters: int
    non_embedding_parameters: int
    world_size: int
    # Where it ran: not part of the job id (docs/config.md), so recorded here.
    device: str  # "cpu", "cuda", ...
    precision: Literal["fp32", "bf16"]
    # The step from which the job ran compiled (training.compile; hdee.compiling), None when
    # eager throughout. Like device, not part of the job id for compile: auto.
    compiled_from_step: int | None = None
    # sha256 of final/model.safetensors: every reader checks it (hdee.integrity), so weights
    # changed after training never become a number.
    weights_sha256: str


# ----------------------------------------------------------------------------------------------
# difficulty/difficulty.json


class DifficultyRecord(Record):
    format: Literal["hdee-difficulty"] = "hdee-difficulty"
    version: Literal[1] = 1
    MADE_BY: ClassVar[str] = "the 'difficulty' stage"

    method: str
    seed_sizes: list[str]
    perplexity: dict[str, float]  # domain -> the ranking perplexity
    seed_perplexity: dict[str, dict[str, float]]  # seed size -> domain -> perplexity
    ranking: list[str]  # easiest first
    classes: dict[str, str]  # trainable domain -> class
    cut_points: list[float]
    held_out_classes: dict[str, str]  # held-out domain -> the class its perplexity falls in


# ----------------------------------------------------------------------------------------------
# Which ensemble produced an output (hdee.ensemble_spec, resolved by hdee.inference)


class ResolvedEnsemble(_Part):
    """An ensemble spec resolved against a run: exactly the experts, prior and routing that
    produced an output. Written into results.json, tasks/results.json, an export's config and
    the generate JSON lines."""

    configuration: str
    iteration: int
    members: dict[str, str]  # member name -> job id, in mixing order
    excluded: dict[str, str] = {}  # opt-out: withdrawn member name -> job id
    prior: str  # the spec's grammar: uniform | cached | cached:DOMAIN | cluster | W,W,...
    prior_weights: dict[str, float] | None = None  # P(j) when one prior weighs all text
    cluster_temperature: float | None = None  # prior: cluster: softmax temperature
    cluster_top_k: int | None = None  # prior: cluster: nearest clusters kept (None: all)
    member_clusters: dict[str, str] | None = None  # prior: cluster: member -> its cluster
    posterior: Literal["prefix", "updating"]
    routing: Literal["none", "prefix", "prior", "budget"]
    experts: int | list[int] | None = None  # k kept (evaluate: the sweep of k)
    route_tokens: int | None = None  # r (prefix, budget; prior: cluster reads r tokens)
    flop_budget: float | None = None  # budget routing: forward FLOPs per token after routing


# ----------------------------------------------------------------------------------------------
# evaluation/results.json (documented in docs/evaluation.md)


class Score(_Part):
    perplexity: float
    tokens: int
    expert: str | None = None  # best_single: the lane of the winning expert
    job_id: str | None = None  # single experts and best_single


class DomainScores(_Part):
    methods: dict[str, Score]  # method -> score
    mean_posterior: dict[str, dict[str, float]] = {}  # method -> lane -> mean weight
    single_experts: dict[str, Score] | None = None  # lane -> score
    cached_prior: dict[str, float] | None = None  # lane -> prior
    cached_prior_sequences: int | None = None


class IterationResults(_Part):
    experts: dict[str, str]  # member (lane, or lane@k) -> job id
    domains: dict[str, DomainScores]
    ensemble: ResolvedEnsemble | None = None  # version 4: the spec that chose the experts


class ConfigurationResults(_Part):
    final_iteration: int
    iterations: dict[int, IterationResults]

    @property
    def final(self) -> IterationResults:
        return self.iterations[self.final_iteration]


class DomainInfo(_Part):
    kind: Literal["trained", "held_out"]
    test_windows: int
    validation_windows: int | None = None


# Quality vs compute of routed (sparse) ensembles (hdee.routing; the "compute" section of
# docs/evaluation.md).


class RoutedScore(_Part):
    """One system's perplexity and the forward FLOPs per scored token it spends."""

    perplexity: float
    flops_per_token: float
    tokens: int
    experts: int | None = None  # k kept after routing (the full ensemble: every member)
    flop_budget: float | None = None  # budget routing: FLOPs/token allowed after routing
    route_tokens: int | None = None  # r: the routing prefix every member runs on
    kept: dict[str, float] | None = None  # member -> share of windows that kept it
    member: str | None = None  # best single: the winning member
    job_id: str | None = None  # best single: its job
    router_flops_per_token: float | None = None  # prior: cluster: the router's share of
    # flops_per_token (tf-idf projection, distances, softmax; hdee.shapes.cluster_router_flops)
    cluster_top_k: int | None = None  # cluster routing: nearest clusters kept


class DomainCompute(_Part):
    full: RoutedScore  # every member on every token (dense posterior)
    best_single: RoutedScore  # the best single member on this domain
    latest: RoutedScore | None = None  # members: all: the latest-per-lane ensemble, dense
    routed: list[RoutedScore] = []  # one per routing setting (k, or the budget)
    cluster: list[RoutedScore] = []  # version 5: routing by clusters, one per top k


class ConfigurationCompute(_Part):
    iteration: int
    members: dict[str, str]  # member -> job id
    flops_per_token: dict[str, float]  # member -> forward FLOPs per token, F_j
    domains: dict[str, DomainCompute]


class ComputeResults(_Part):
    members: Literal["latest", "all"]
    routing: Literal["none", "prefix", "prior", "budget"]
    route_tokens: int  # r (0 for prior and none)
    prior: str  # the prior every system of this section starts from (the spec's grammar)
    cluster_temperature: float | None = None  # version 5: the `cluster` rows' temperature
    configurations: dict[str, ConfigurationCompute]


# ----------------------------------------------------------------------------------------------
# Paired uncertainty (hdee.statistics, written by hdee.uncertainty): kept apart from the scores.


class PairedDifference(_Part):
    """delta = log ppl(candidate) - log ppl(reference) on one domain (negative: the candidate
    is better), with its paired-bootstrap percentile interval [low, high]."""

    domain: str
    reference: str  # configurations: a configuration; methods: a method
    candidate: str
    method: str | None = None  # configuration pairs: the method both are scored with
    configuration: str | None = None  # method pairs: the configuration both belong to
    delta: float
    low: float
    high: float


class DomainResampling(_Part):
    unit: Literal["documents", "windows"]  # what the bootstrap resampled on this domain
    units: int  # how many of them the test windows come from


class Uncertainty(_Part):
    resamples: int
    level: float  # e.g. 0.95: [low, high] are the 2.5 / 97.5 percentiles
    seed: int
    iteration: Literal["final"] = "final"  # the ensembles compared
    domains: dict[str, DomainResampling]
    configurations: list[PairedDifference]  # every pair of configurations, per method
    methods: list[PairedDifference]  # every pair of methods, per configuration


class OptOutDomain(_Part):
    """One domain's perplexity with and without the withdrawn members, and the paired interval
    of delta = log ppl(without) - log ppl(with) (positive: withdrawing them hurts here)."""

    with_members: float
    without_members: float
    delta: float
    low: float
    high: float


class OptOut(_Part):
    """The opt-out study of one withdrawn name (evaluation.opt_out) in one configuration's final
    ensemble: the dense posterior with the ensemble keys' prior, with and without them."""

    withdrawn: str  # the opt_out entry: a domain, a member or a job id
    configuration: str
    excluded: dict[str, str]  # the members it withdrew (name -> job id)
    domains: dict[str, OptOutDomain]


class EvaluationResults(Record):
    format: Literal["hdee-evaluation"] = "hdee-evaluation"
    version: Literal[3, 4, 5] = 5
    MADE_BY: ClassVar[str] = "`hdee evaluate RUN`"
    # 4 added the ensembles' specs; 5 the cluster prior (its keys in the specs, its rows and
    # router FLOPs in `compute`)
    ALSO_READS: ClassVar[tuple[int, ...]] = (3, 4)

    posterior: Literal["prefix", "updating"]
    methods: list[str]
    seq_len: int
    cached_prior_decay: float
    cached_prior_update: Literal["window", "last_token"] = "window"
    device: str
    domains: dict[str, DomainInfo]
    configurations: dict[str, ConfigurationResults]
    compute: ComputeResults | None = None  # quality vs compute (version 3); its `members` says
    # which experts every ensemble above holds
    uncertainty: Uncertainty | None = None  # None when evaluation.bootstrap_resamples is 0
    opt_out: list[OptOut] | None = None  # evaluation.opt_out (version 4)


# ----------------------------------------------------------------------------------------------
# tasks/results.json (`hdee tasks`, docs/export.md)


class SystemResult(_Part):
    """One scored model: a configuration's ensemble or a single expert."""

    kind: Literal["ensemble", "single_expert"]
    configuration: str | None = None  # the ensemble's configuration
    job_id: str | None = None  # the single expert's job
    members: list[str] = []  # the ensemble's members (a single expert: the names it has)
    ensemble: ResolvedEnsemble | None = None  # version 2: the ensemble's resolved spec
    metrics: dict[str, dict[str, float]]  # task -> "metric,filter" -> value
    requests: int  # harness requests (loglikelihood + generation) it answered
    seconds: float


class BestSingle(_Part):
    system: str
    value: float


class TasksResults(Record):
    format: Literal["hdee-tasks"] = "hdee-tasks"
    version: Literal[1, 2, 3] = 3
    # 2 added each ensemble's resolved spec; 3 the cluster prior's keys in it
    ALSO_READS: ClassVar[tuple[int, ...]] = (1, 2)
    MADE_BY: ClassVar[str] = "`hdee tasks RUN --tasks ...`"

    tasks: list[str]
    limit: int | None = None
    num_fewshot: int | None = None
    posterior: str
    prior: str = "uniform"
    harness_version: str
    higher_is_better: dict[str, dict[str, bool]]  # task -> "metric,filter" -> bool
    systems: dict[str, SystemResult]
    best_single: dict[str, dict[str, BestSingle]]  # task -> "metric,filter" -> the best expert
