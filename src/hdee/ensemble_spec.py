"""One ensemble, spelt once: which experts it holds, how they are weighted, how it routes.

Every inference command describes the ensemble it runs with the same keys, validated here:

    members      latest | all     the latest expert of every lane (named by lane), or BTM's
                                  growing forest: every expert of every iteration (lane@k)
    iteration    k                the ensemble after iteration k (default: the last)
    exclude      [NAME, ...]      opt-out: members withdrawn at inference, by member name (lane,
                                  lane@k), job id, or domain (every member whose training, or an
                                  ancestor's, read that domain: its weights carry the data)
    prior        uniform | cached | cached:DOMAIN | cluster | W,W,...
                                  P(j): uniform; each evaluated domain's own cached prior (only
                                  `hdee evaluate` scores text of a known domain); the cached prior
                                  estimated on DOMAIN's validation text; the cluster prior of the
                                  text itself (a discovered run: the first route_tokens tokens'
                                  tf-idf distances to the clusters, softmax at cluster_temperature,
                                  optionally the cluster_top_k nearest only); or one weight per
                                  member
    posterior    prefix | updating
    routing      none | prefix | prior | budget, with experts (k), route_tokens (r), flop_budget

`hdee evaluate` reads them from the config's `evaluation` section (`EvaluationConfig` extends
`EnsembleKeys`; there `experts` may list several k, the quality-vs-compute sweep);
`hdee generate`, `export` and `tasks` take them as flags with the same names (`--members`,
`--exclude`, `--prior`, ...), starting from the run's evaluation keys (`spec_defaults`). The
defaults are written once, in `EnsembleKeys`. A spec resolved against a run's plan
(`hdee.inference.resolve_ensemble`) is a `records.ResolvedEnsemble`, which every command writes
into what it produces.

This module is pure data: no torch, no run directory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hdee.errors import UsageError
from hdee.records import Plan

Members = Literal["latest", "all"]
MEMBERS: tuple[str, ...] = ("latest", "all")
PosteriorMode = Literal["prefix", "updating"]
POSTERIOR_MODES: tuple[str, ...] = ("prefix", "updating")
Routing = Literal["none", "prefix", "prior", "budget"]
ROUTINGS: tuple[str, ...] = ("none", "prefix", "prior", "budget")
PRIOR_GRAMMAR = "uniform, cached, cached:DOMAIN, cluster or W,W,... (one weight per member)"


# ----------------------------------------------------------------------------------------------
# The prior's grammar


@dataclass(frozen=True)
class Prior:
    """P(j) of an ensemble. `str(prior)` is its grammar string (what the files record)."""

    kind: Literal["uniform", "cached", "cluster", "weights"]
    domain: str | None = None  # cached: the domain whose validation text estimates it (None:
    # the domain being scored, which only `hdee evaluate` knows)
    weights: tuple[float, ...] | None = None  # weights: one per member, in member order

    def __str__(self) -> str:
        if self.kind == "weights":
            assert self.weights is not None
            return ",".join(f"{w:g}" for w in self.weights)
        if self.kind == "cached" and self.domain is not None:
            return f"cached:{self.domain}"
        return self.kind

    @property
    def per_domain(self) -> bool:
        """True for `cached`: a different prior on every scored domain."""
        return self.kind == "cached" and self.domain is None


def parse_prior(value: str | Sequence[float] | Prior) -> Prior:
    """A `Prior` from its grammar: uniform | cached | cached:DOMAIN | W,W,... (or a list of
    weights, as YAML gives them). ValueError names what was expected."""
    if isinstance(value, Prior):
        return value
    if isinstance(value, (list, tuple)):
        return _weights_prior(list(value), str(list(value)))
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected {PRIOR_GRAMMAR}, got {value!r}")
    text = value.strip()
    if text in ("uniform", "cached", "cluster"):
        return Prior(text)  # type: ignore[arg-type]
    if text.startswith("cached:"):
        domain = text.split(":", 1)[1].strip()
        if not domain:
            raise ValueError(f"{text!r}: expected cached:DOMAIN with a domain name")
        return Prior("cached", domain=domain)
    parts = text.split(",")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        raise ValueError(
            f"{text!r}: expected {PRIOR_GRAMMAR}; for the cached prior of a domain write "
            f"cached:{text}"
        ) from None
    return _weights_prior(numbers, text)


def _weights_prior(values: list[Any], text: str) -> Prior:
    try:
        weights = tuple(float(w) for w in values)
    except (TypeError, ValueError):
        raise ValueError(f"{text}: weights must be numbers") from None
    if not weights or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{text}: weights must be finite numbers")
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"{text}: weights must be non-negative and not all 0")
    return Prior("weights", weights=weights)


# ----------------------------------------------------------------------------------------------
# The keys


class EnsembleKeys(BaseModel):
    """The keys every inference command shares, with their defaults (the one place they are
    written). `EnsembleSpec` adds one ensemble's iteration and k; `EvaluationConfig` adds the
    evaluation's methods and its sweep of k."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    members: Members = Field(
        "latest",
        description="'latest': the latest expert of every lane (the final ensemble); 'all': "
        "every expert of every lane and iteration (BTM's growing forest).",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Opt-out: members withdrawn at inference, by member name (lane, or lane@k "
        "with members: all), job id, or domain (every member trained on it, or descended from "
        "an expert trained on it). Their weights are never loaded.",
    )
    prior: str = Field(
        "uniform",
        description="P(j) of the posterior: 'uniform'; 'cached': each evaluated domain's own "
        "cached prior (hdee evaluate only); 'cached:DOMAIN': the cached prior estimated on "
        "DOMAIN's validation text; 'cluster': from the text itself, by the clusters `hdee "
        "discover` found (a sequence's first route_tokens tokens; docs/discovery.md); or "
        "'W,W,...': one weight per member.",
    )
    cluster_temperature: float = Field(
        0.1,
        gt=0,
        description="prior: cluster: the softmax temperature over squared distances to the "
        "clusters (c-BTM's 0.1; larger spreads the prior).",
    )
    cluster_top_k: int | None = Field(
        None,
        ge=1,
        description="prior: cluster: only the k nearest clusters keep mass; their members alone "
        "run after route_tokens (default: every cluster).",
    )
    posterior: PosteriorMode = Field(
        "prefix",
        description="'prefix': P(j|x<t) from the whole prefix (HDEE); 'updating': from the "
        "previous token's likelihood only (BTM/DEMix code).",
    )
    routing: Routing = Field(
        "none",
        description="'none': every member on every token; 'prefix': every member on the first "
        "route_tokens tokens, then the top-k of that posterior; 'prior': the top-k of the prior "
        "(no routing prefix); 'budget': like prefix, keeping the most posterior mass that fits "
        "flop_budget.",
    )
    route_tokens: int = Field(
        32,
        gt=0,
        description="Routing prefix r: tokens every member runs on (prefix, budget; prior: "
        "cluster reads them).",
    )
    flop_budget: float | None = Field(
        None, gt=0, description="Forward FLOPs per token after routing (routing: budget)."
    )

    @field_validator("prior", mode="before")
    @classmethod
    def _prior_grammar(cls, value: Any) -> str:
        return str(parse_prior(value))

    @field_validator("exclude", mode="before")
    @classmethod
    def _exclude_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # `--set evaluation.exclude=bible` or "a,b"
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def prior_choice(self) -> Prior:
        return parse_prior(self.prior)

    @model_validator(mode="after")
    def _routing_keys_fit(self) -> EnsembleKeys:
        if self.routing == "budget" and self.flop_budget is None:
            raise ValueError("flop_budget: required with routing: budget (FLOPs/token)")
        if self.routing != "budget" and self.flop_budget is not None:
            raise ValueError(f"flop_budget is only used with routing: budget, not {self.routing!r}")
        if self.cluster_top_k is not None and self.prior_choice.kind != "cluster":
            raise ValueError(f"cluster_top_k is only used with prior: cluster, not {self.prior!r}")
        if self.routing == "prior" and self.prior_choice.kind == "cluster":
            raise ValueError(
                "routing: 'prior' routes before the first token, and the cluster prior reads the "
                "first route_tokens tokens: use cluster_top_k (routing none) or routing prefix"
            )
        if self.routing == "prior" and self.prior_choice.kind == "uniform":
            raise ValueError(
                "routing: 'prior' keeps the top k of the prior, and a uniform prior ranks no "
                "expert: set prior (e.g. cached, cached:DOMAIN or W,W,...)"
            )
        return self


class EnsembleSpec(EnsembleKeys):
    """One ensemble of a configuration: the shared keys plus its iteration and k."""

    iteration: int | None = Field(None, ge=1, description="After this iteration (default last).")
    experts: int | None = Field(
        None, ge=1, description="k: the experts kept after routing (prefix, prior)."
    )

    @model_validator(mode="before")
    @classmethod
    def _experts_alone_route_by_prefix(cls, data: Any) -> Any:
        # `--experts K` with no routing named keeps the top K after the prefix, as it always has.
        if isinstance(data, dict) and data.get("experts") is not None and "routing" not in data:
            return {**data, "routing": "prefix"}
        return data

    @model_validator(mode="after")
    def _k_fits_routing(self) -> EnsembleSpec:
        if self.routing in ("prefix", "prior") and self.experts is None:
            raise ValueError(f"experts: routing {self.routing!r} keeps the top k: give k")
        if self.routing in ("none", "budget") and self.experts is not None:
            raise ValueError(f"experts: k is not used with routing {self.routing!r}")
        return self

    @property
    def routes(self) -> bool:
        return self.routing != "none"


def spec_defaults(keys: EnsembleKeys) -> dict[str, Any]:
    """The shared keys a single-ensemble command (generate, export, tasks) starts from: the
    run's evaluation keys, except its routing (evaluation sweeps k; one ensemble is dense unless
    a command routes it) and a per-domain prior (free text has no domain: uniform)."""
    defaults = keys.model_dump(
        include={"members", "exclude", "prior", "posterior", "cluster_temperature", "cluster_top_k"}
    )
    if keys.prior_choice.per_domain:
        defaults["prior"] = "uniform"
    if keys.prior_choice.kind == "cluster":  # the cluster prior reads the first r tokens
        defaults["route_tokens"] = keys.route_tokens
    return defaults


# ----------------------------------------------------------------------------------------------
# Members of a configuration's ensemble (pure: a plan in, names out)


def plan_members(
    plan: Plan, configuration: str, iteration: int | None = None, members: Members = "latest"
) -> tuple[int, dict[str, str]]:
    """(iteration, {member name: job id}) of a configuration after `iteration` (default: last).

    latest: the ensemble of that iteration, one expert per lane, named by its lane. all: BTM's
    growing forest, every expert of every lane and iteration up to it, named `lane@k` (k: the
    iteration that trained it), iteration by iteration in the plan's lane order; a lane not
    retrained in an iteration adds nobody.
    """
    index, latest = plan.ensemble(configuration, iteration)
    if members == "latest":
        return index, latest
    if members != "all":
        raise ValueError(f"members must be 'latest' or 'all', got {members!r}")
    forest: dict[str, str] = {}
    seen: set[str] = set()
    for k in range(1, index + 1):
        for lane, job_id in plan.ensemble(configuration, k)[1].items():
            if job_id not in seen:
                seen.add(job_id)
                forest[f"{lane}@{k}"] = job_id
    return index, forest


def trained_on(plan: Plan, job_id: str) -> list[str]:
    """Every corpus a job's weights have read: its own domain and its ancestors' (init_from),
    back to the seed's general corpus."""
    domains = []
    current: str | None = job_id
    while current is not None and current in plan.jobs:
        job = plan.jobs[current]
        domains.append(job.domain)
        current = job.init_from
    return domains


def select_members(
    plan: Plan, configuration: str, keys: EnsembleKeys, iteration: int | None = None
) -> tuple[int, dict[str, str], dict[str, str]]:
    """(iteration, kept {name: job id}, excluded {name: job id}): the configuration's members
    under `keys.members`, without those `keys.exclude` withdraws. ValueError names an exclude
    entry that matches nothing, and refuses to withdraw every member (SpecError)."""
    index, everyone = plan_members(plan, configuration, iteration, keys.members)
    excluded: dict[str, str] = {}
    for name in keys.exclude:
        hits = {
            member: job_id
            for member, job_id in everyone.items()
            if name in (member, job_id) or name in trained_on(plan, job_id)
        }
        if not hits:
            domains = sorted({d for job in everyone.values() for d in trained_on(plan, job)})
            raise SpecError(
                f"exclude {name!r} matches no member of {configuration!r} (members: "
                f"{', '.join(everyone)}; domains they were trained on: {', '.join(domains)})"
            )
        excluded.update(hits)
    kept = {member: job_id for member, job_id in everyone.items() if member not in excluded}
    if not kept:
        raise SpecError(
            f"exclude {keys.exclude} withdraws every member of {configuration!r} (every expert "
            "descends from a seed trained on the general corpus): nothing is left to ensemble"
        )
    return index, kept, excluded


class SpecError(UsageError):
    """An ensemble spec that does not fit the run it is resolved against (a member or domain
    it does not have, k larger than the members, ...): a bad argument, exit code 2."""
