"""`hdee evaluate`: test perplexity of every configuration, domain and ensembling method.

Each expert runs once per (domain, split): its label log-probabilities are cached as
safetensors at `RunLayout.label_logprobs(job_id, domain, split)`, and every configuration and
method is computed from that cache. Experts shared by several configurations (the same job id)
are therefore never re-run, and a second `hdee evaluate` only re-mixes.

The cached prior is estimated on validation windows only (the public reference estimated it on
the test windows it then scored). Output schema: docs/evaluation.md.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hdee.atomic import atomic_path, read_json, write_text
from hdee.cluster_routing import load_router, router_flops_per_token, window_prefixes
from hdee.clusters import ClusterRouter, member_log_prior
from hdee.config import EvaluationConfig, ExperimentConfig
from hdee.console import progress as progress_bar
from hdee.data.loaders import eval_windows
from hdee.data.tokens import load_tokens
from hdee.ensemble import (
    METHODS,
    MixInputs,
    cached_prior,
    mean_posterior,
    mixture_log_probs,
    perplexity,
)
from hdee.ensemble_spec import SpecError, select_members
from hdee.integrity import checked_weights_sha256
from hdee.layout import RunLayout
from hdee.model import attention_implementation
from hdee.records import (
    ComputeResults,
    ConfigurationCompute,
    ConfigurationResults,
    DomainCompute,
    DomainInfo,
    DomainScores,
    EvaluationResults,
    IterationResults,
    Plan,
    ResolvedEnsemble,
    RoutedScore,
    Score,
)
from hdee.routing import cluster_mixture, routed_flops_per_token, spec_mixture
from hdee.scoring import evaluation_dtype, load_expert, resolve_device, window_log_probs
from hdee.shapes import forward_flops_per_token
from hdee.statistics import window_documents
from hdee.uncertainty import opt_out_results, paired_uncertainty

CACHE_FORMAT = "hdee-label-logprobs"
CACHE_VERSION = "3"  # 2: keyed by the expert's weights sha256; 3: and by the precision
CSV_COLUMNS = (
    "configuration",
    "iteration",
    "domain",
    "domain_kind",
    "method",
    "expert",
    "job_id",
    "perplexity",
    "tokens",
    "posterior",
)


# ----------------------------------------------------------------------------------------------
# Which ensembles and which (expert, domain, split) log-probs are needed


def selected_ensembles(
    plan: Plan, settings: EvaluationConfig
) -> list[tuple[str, int, dict[str, str], dict[str, str]]]:
    """(configuration, 1-based iteration, {member: job_id}, {excluded member: job_id}) of every
    ensemble to evaluate: the final one of each configuration (every one with
    `every_iteration`), its members chosen by the ensemble keys (`members`, `exclude`)."""
    chosen = []
    for name, configuration in plan.configurations.items():
        if not configuration.ensembles:
            raise ValueError(f"plan.json: configuration {name!r} has no ensembles")
        last = len(configuration.ensembles)
        for iteration in range(1 if settings.every_iteration else last, last + 1):
            chosen.append((name, *select_members(plan, name, settings, iteration)))
    return chosen


def resolved_record(
    settings: EvaluationConfig,
    configuration: str,
    iteration: int,
    members: dict[str, str],
    excluded: dict[str, str],
    clusters: dict[str, str] | None = None,
) -> ResolvedEnsemble:
    """The spec of one evaluated ensemble, as results.json records it (`clusters`: prior
    cluster's member -> cluster)."""
    prior = settings.prior_choice
    weights = None
    if prior.kind == "weights" and prior.weights is not None:
        total = sum(prior.weights)
        weights = dict(zip(members, (w / total for w in prior.weights), strict=False))
    routed = settings.routing in ("prefix", "budget") or prior.kind == "cluster"
    return ResolvedEnsemble(
        configuration=configuration,
        iteration=iteration,
        members=members,
        excluded=excluded,
        prior=settings.prior,
        prior_weights=weights,
        **cluster_keys(settings, clusters),
        posterior=settings.posterior,
        routing=settings.routing,
        experts=settings.experts,
        route_tokens=settings.route_tokens if routed else None,
        flop_budget=settings.flop_budget,
    )


def cluster_keys(settings: Any, clusters: dict[str, str] | None) -> dict[str, Any]:
    """The cluster prior's fields of a ResolvedEnsemble (none for another prior)."""
    if settings.prior_choice.kind != "cluster":
        return {}
    return {
        "cluster_temperature": settings.cluster_temperature,
        "cluster_top_k": settings.cluster_top_k,
        "member_clusters": clusters,
    }


# ----------------------------------------------------------------------------------------------
# The label log-prob cache


def _windows_fingerprint(tokens: np.ndarray, seq_len: int, count: int) -> str:
    """Hash of exactly the tokens the windows read, so a re-prepared split is never mistaken
    for the cached one (cheap: a few MB even for 1000 windows of 1024 tokens)."""
    used = np.ascontiguousarray(tokens[: count * seq_len + 1])
    return hashlib.sha256(used.dtype.str.encode() + used.tobytes()).hexdigest()[:32]


def _cache_metadata(
    job_id: str,
    domain: str,
    split: str,
    seq_len: int,
    count: int,
    fingerprint: str,
    weights_sha256: str,
    precision: str,
) -> dict[str, str]:
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "job_id": job_id,
        "weights_sha256": weights_sha256,
        "domain": domain,
        "split": split,
        "seq_len": str(seq_len),
        "num_windows": str(count),
        "tokens_sha256": fingerprint,
        # fp32 and bf16 log-probs differ (~1e-3): a file is only reused at its own precision.
        "precision": precision,
    }


def read_cached_log_probs(path: Path, expected: dict[str, str]) -> torch.Tensor | None:
    """The cached `[num_windows, seq_len]` tensor, or None when absent, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata() != expected:
                return None
            tensor = handle.get_tensor("log_probs")
    except Exception:  # a corrupt cache file is recomputed, never trusted
        return None
    shape = (int(expected["num_windows"]), int(expected["seq_len"]))
    return tensor if tuple(tensor.shape) == shape else None


def write_cached_log_probs(path: Path, log_probs: torch.Tensor, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({"log_probs": log_probs.float().contiguous()}, str(tmp), metadata=metadata)


class LogProbCache:
    """Label log-probs per (job, domain, split): from disk when present, else computed with
    each expert loaded once for all of its missing (domain, split) pairs."""

    def __init__(self, layout: RunLayout, config: ExperimentConfig, device: torch.device):
        self.layout = layout
        self.config = config
        self.device = device
        self.seq_len = config.data.seq_len
        self._tokens: dict[tuple[str, str], tuple[np.ndarray, int, str]] = {}
        self._loaded: dict[tuple[str, str, str], torch.Tensor] = {}

    def max_windows(self, split: str) -> int | None:
        if split == "validation":
            return self.config.evaluation.cached_prior_sequences
        return self.config.evaluation.max_test_sequences

    def windows(self, domain: str, split: str) -> tuple[np.ndarray, int, str]:
        """(tokens, window count, fingerprint) of a domain's split, read once."""
        key = (domain, split)
        if key not in self._tokens:
            tokens = load_tokens(self.layout.tokens(domain, split))
            count = eval_windows(tokens, self.seq_len, self.max_windows(split))
            self._tokens[key] = (tokens, count, _windows_fingerprint(tokens, self.seq_len, count))
        return self._tokens[key]

    def metadata(self, job_id: str, domain: str, split: str) -> dict[str, str]:
        _, count, fingerprint = self.windows(domain, split)
        # Verified against the job's result.json first (IntegrityError naming the file): a
        # cached log-prob is only ever reused for the very weights it was computed from.
        weights = checked_weights_sha256(self.layout.job(job_id).final)
        precision = self.config.evaluation.precision
        return _cache_metadata(
            job_id, domain, split, self.seq_len, count, fingerprint, weights, precision
        )

    def get(self, job_id: str, domain: str, split: str) -> torch.Tensor:
        key = (job_id, domain, split)
        if key not in self._loaded:  # shared experts appear in several configurations
            path = self.layout.label_logprobs(job_id, domain, split)
            cached = read_cached_log_probs(path, self.metadata(job_id, domain, split))
            if cached is None:
                raise RuntimeError(f"label log-probs of {job_id} on {domain}/{split} missing")
            self._loaded[key] = cached
        return self._loaded[key]

    def fill(self, needed: list[tuple[str, str, str]], progress: bool) -> None:
        """Compute every missing (job, domain, split), grouped by job so each model loads once."""
        missing: dict[str, list[tuple[str, str]]] = {}
        for job_id, domain, split in needed:
            path = self.layout.label_logprobs(job_id, domain, split)
            if read_cached_log_probs(path, self.metadata(job_id, domain, split)) is None:
                missing.setdefault(job_id, []).append((domain, split))
        total = sum(self.windows(d, s)[1] for pairs in missing.values() for d, s in pairs)
        batch_size = self.config.evaluation.batch_size
        with progress_bar("label log-probs", total=total, unit="windows", enabled=progress) as bar:
            for job_id, pairs in missing.items():
                model = load_expert(self.layout.job(job_id).final, self.device)
                dtype = evaluation_dtype(self.config.evaluation.precision)
                if dtype is not None:
                    model.set_attn_implementation(
                        attention_implementation(self.device, dtype, self.seq_len)
                    )
                for domain, split in pairs:
                    tokens, count, _ = self.windows(domain, split)
                    bar.update(description=f"{job_id} {domain}/{split}")
                    log_probs = window_log_probs(
                        model, tokens, self.seq_len, batch_size, self.max_windows(split), dtype
                    )
                    write_cached_log_probs(
                        self.layout.label_logprobs(job_id, domain, split),
                        log_probs,
                        self.metadata(job_id, domain, split),
                    )
                    bar.update(advance=count)
                del model
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Mixing one ensemble on one domain


def _score(log_probs: torch.Tensor, **extra: str) -> Score:
    return Score(perplexity=perplexity(log_probs), tokens=int(log_probs.numel()), **extra)


def evaluate_ensemble_on_domain(
    test_lp: torch.Tensor,
    validation_lp: torch.Tensor | None,
    members: list[str],
    job_ids: list[str],
    methods: list[str],
    settings: EvaluationConfig,
) -> DomainScores:
    """Every method of `methods` (hdee.ensemble.METHODS) for one ensemble on one domain, from
    label log-probs `[E, N, T]`."""
    inputs = MixInputs.of(test_lp, validation_lp, settings)
    scores = DomainScores(methods={})
    for name in methods:
        mixed = METHODS[name].mix(inputs)
        score = _score(mixed.log_probs)
        if mixed.log_weights is not None:
            weights = mean_posterior(mixed.log_weights).tolist()
            scores.mean_posterior[name] = dict(zip(members, weights, strict=True))
        if mixed.prior is not None:
            assert validation_lp is not None
            scores.cached_prior = dict(zip(members, mixed.prior.tolist(), strict=True))
            scores.cached_prior_sequences = int(validation_lp.shape[1])
        if mixed.member is not None:
            scores.single_experts = {
                member: _score(test_lp[j], job_id=job_id)
                for j, (member, job_id) in enumerate(zip(members, job_ids, strict=True))
            }
            score = scores.single_experts[members[mixed.member]].model_copy(
                update={"expert": members[mixed.member]}
            )
        scores.methods[name] = score
    return scores


# ----------------------------------------------------------------------------------------------
# The run


def evaluate_run(
    config: ExperimentConfig, layout: RunLayout, progress: bool = True
) -> EvaluationResults:
    """Evaluate every configuration in `RUN/plan.json`; write and return the results.

    Writes `RUN/evaluation/results.json` and `results.csv` (schema: docs/evaluation.md).
    """
    plan = Plan.read(layout.plan)
    settings = config.evaluation
    domains = plan.domain_kinds()
    if not domains:
        raise ValueError(f"{layout.plan} lists no trained or held-out domains to evaluate")
    ensembles = selected_ensembles(plan, settings)
    # prior cluster: every ensemble's router, checked before any expert runs.
    clusters = {
        (name, iteration): (
            load_router(layout, plan, members, settings).member_names(list(members))
            if settings.prior_choice.kind == "cluster"
            else None
        )
        for name, iteration, members, _ in ensembles
    }
    splits = ["test"] + (["validation"] if settings.needs_validation else [])
    device = resolve_device()
    cache = LogProbCache(layout, config, device)
    # Every (job, domain, split) any selected ensemble needs, each once, in a stable order.
    needed = list(
        dict.fromkeys(
            (job_id, domain, split)
            for _, _, members, _ in ensembles
            for job_id in members.values()
            for domain in domains
            for split in splits
        )
    )
    cache.fill(needed, progress)

    results = EvaluationResults(
        posterior=settings.posterior,
        methods=list(settings.methods),
        seq_len=config.data.seq_len,
        cached_prior_decay=settings.cached_prior_decay,
        cached_prior_update=settings.cached_prior_update,
        device=str(device),
        domains={
            domain: DomainInfo(
                kind=kind,
                test_windows=cache.windows(domain, "test")[1],
                validation_windows=(
                    cache.windows(domain, "validation")[1] if "validation" in splits else None
                ),
            )
            for domain, kind in domains.items()
        },
        configurations={},
    )
    for name, iteration, members, excluded in ensembles:
        configuration = results.configurations.setdefault(
            name,
            ConfigurationResults(
                final_iteration=len(plan.configurations[name].ensembles), iterations={}
            ),
        )
        configuration.iterations[iteration] = IterationResults(
            experts=members,
            domains=score_ensemble(cache, members, list(domains), settings, "validation" in splits),
            ensemble=resolved_record(
                settings, name, iteration, members, excluded, clusters[name, iteration]
            ),
        )
    results.compute = compute_results(config, layout, plan, cache, list(domains))
    documents = test_window_documents(layout, cache, list(domains))
    if settings.bootstrap_resamples:
        results.uncertainty = paired_uncertainty(
            plan, results, cache.get, documents, settings, config.seed
        )
    if settings.opt_out:
        results.opt_out = opt_out_results(
            plan, results, cache.get, documents, settings, config.seed
        )
    results.write(layout.results)
    write_text(layout.results_csv, results_csv(results))
    return results


def score_ensemble(
    cache: LogProbCache,
    members: dict[str, str],
    domains: list[str],
    settings: EvaluationConfig,
    with_validation: bool,
) -> dict[str, DomainScores]:
    """Every method's scores of one ensemble on every domain, from cached label log-probs."""
    names, job_ids = list(members), list(members.values())
    per_domain: dict[str, DomainScores] = {}
    for domain in domains:
        test_lp = torch.stack([cache.get(job, domain, "test") for job in job_ids])
        validation_lp = (
            torch.stack([cache.get(job, domain, "validation") for job in job_ids])
            if with_validation
            else None
        )
        per_domain[domain] = evaluate_ensemble_on_domain(
            test_lp, validation_lp, names, job_ids, list(settings.methods), settings
        )
    return per_domain


# ----------------------------------------------------------------------------------------------
# Quality vs compute: routed (sparse) ensembles (hdee.routing, docs/evaluation.md "Routing")
#
# Computed from the same cached label log-probs as the methods above: the kept experts'
# log-probs at t >= r are exactly what a routed run computes, so the routed perplexity is exact;
# the FLOPs count what a routed run executes (routing prefix included).


def member_flops(layout: RunLayout, job_id: str, seq_len: int) -> float:
    """F_j: forward FLOPs per token of a trained expert, from its config.json (no weights)."""
    from transformers import LlamaConfig

    final = layout.job(job_id).final
    if not (final / "config.json").is_file():
        raise FileNotFoundError(f"{final}: no trained model here (has its job finished?)")
    return float(forward_flops_per_token(LlamaConfig.from_pretrained(final), seq_len))


def _compute_score(log_probs: torch.Tensor, flops_per_token: float, **extra: Any) -> RoutedScore:
    return RoutedScore(
        perplexity=perplexity(log_probs),
        flops_per_token=flops_per_token,
        tokens=int(log_probs.numel()),
        **extra,
    )


def spec_prior(
    cache: LogProbCache, job_ids: list[str], domain: str, settings: EvaluationConfig
) -> torch.Tensor | None:
    """P(j) `[E]` of the ensemble keys' prior for these members scoring `domain`: None
    (uniform), the cached prior of `domain` (prior: cached) or of a named domain
    (cached:DOMAIN) on the members' validation windows, or the given weights normalised. The one
    rule for every command: `hdee.inference` resolves generate's, export's and tasks' prior with
    it too."""
    prior = settings.prior_choice
    if prior.kind == "uniform":
        return None
    if prior.kind == "weights":
        assert prior.weights is not None
        if len(prior.weights) != len(job_ids):
            raise SpecError(
                f"prior {settings.prior}: {len(prior.weights)} weights for {len(job_ids)} "
                "members (one per member, in member order)"
            )
        weights = torch.tensor(prior.weights, dtype=torch.float64)
        return weights / weights.sum()
    source = prior.domain or domain
    validation = torch.stack([cache.get(job, source, "validation") for job in job_ids])
    return cached_prior(validation, settings.cached_prior_decay, settings.cached_prior_update)


def spec_log_prior(
    cache: LogProbCache, job_ids: list[str], domain: str, settings: EvaluationConfig
) -> torch.Tensor | None:
    """log of `spec_prior` (None: uniform)."""
    prior = spec_prior(cache, job_ids, domain, settings)
    return None if prior is None else prior.log()


def routed_scores(
    test_lp: torch.Tensor,
    log_prior: torch.Tensor | None,
    names: list[str],
    flops: list[float],
    settings: EvaluationConfig,
    cluster: tuple[torch.Tensor, float] | None = None,
) -> list[RoutedScore]:
    """One RoutedScore per routing setting of `settings` (k = each of `experts` below the
    number of members, or the budget) for one ensemble on one domain, `test_lp` `[E, N, T]`.
    `cluster`: prior cluster's (log prior `[E, N]` with the spec's top k, router FLOPs per
    token); with routing none and a cluster_top_k, the one row is routing by that top k."""
    if cluster is not None and settings.routing == "none" and settings.cluster_top_k:
        return [_cluster_score(test_lp, cluster, names, flops, settings, settings.cluster_top_k)]
    if settings.routing == "none":
        return []
    count, length = test_lp.shape[0], test_lp.shape[2]
    if settings.routing == "budget":
        plans: list[dict[str, Any]] = [{"flop_budget": settings.flop_budget}]
    else:
        ks = settings.experts or list(range(1, count))
        plans = [{"experts": k} for k in ks if k < count]  # k = E is the full ensemble
    scores = []
    for setting in plans:
        arguments = (settings.posterior, settings.routing, settings.route_tokens)
        if cluster is None:
            mixture, kept, r = spec_mixture(test_lp, log_prior, *arguments, flops=flops, **setting)
        else:
            mixture, kept, r = cluster_mixture(
                test_lp, cluster[0], *arguments, flops=flops, **setting
            )
        share = kept.to(torch.float64).mean(dim=1).tolist()
        router = cluster[1] if cluster is not None else 0.0
        scores.append(
            _compute_score(
                mixture,
                routed_flops_per_token(flops, kept, r, length) + router,
                experts=setting.get("experts"),
                flop_budget=setting.get("flop_budget"),
                route_tokens=r,
                kept=dict(zip(names, share, strict=True)),
                router_flops_per_token=router if cluster is not None else None,
            )
        )
    return scores


# Routing by clusters (prior: cluster; hdee.cluster_routing): the members of the top k clusters
# of a window's first r tokens continue after r.


def cluster_distances_of(cache: LogProbCache, domain: str, router: ClusterRouter) -> torch.Tensor:
    """[N, K] squared distances of each test window's first r tokens to the members' clusters."""
    tokens, count, _ = cache.windows(domain, "test")
    return router.distances(window_prefixes(tokens, cache.seq_len, count, router.route_tokens))


def cluster_prior_of(
    distances: torch.Tensor, router: ClusterRouter, top_k: int | None
) -> torch.Tensor:
    """[E, N] log P(member | window prefix) with this top k of clusters."""
    log_prior = member_log_prior(distances, router.member_clusters, router.temperature, top_k)
    return log_prior.T.contiguous()


def _cluster_score(
    test_lp: torch.Tensor,
    cluster: tuple[torch.Tensor, float],
    names: list[str],
    flops: list[float],
    settings: EvaluationConfig,
    top_k: int,
) -> RoutedScore:
    """Routing by clusters: the dense posterior before r, from r the cluster prior's members."""
    log_prior, router = cluster
    mixture, kept, r = cluster_mixture(
        test_lp, log_prior, settings.posterior, "none", settings.route_tokens
    )
    length = test_lp.shape[2]
    share = kept.to(torch.float64).mean(dim=1).tolist()
    return _compute_score(
        mixture,
        routed_flops_per_token(flops, kept, r, length) + router,
        route_tokens=r,
        kept=dict(zip(names, share, strict=True)),
        router_flops_per_token=router,
        cluster_top_k=top_k,
    )


def cluster_scores(
    test_lp: torch.Tensor,
    distances: torch.Tensor,
    router: ClusterRouter,
    names: list[str],
    flops: list[float],
    settings: EvaluationConfig,
) -> list[RoutedScore]:
    """Routing by clusters for each k of the sweep below the clusters the members cover
    (`evaluation.experts`, default 1..K-1): the `cluster` rows beside prefix routing."""
    count = distances.shape[1]
    ks = [k for k in (settings.experts or range(1, count)) if k < count]
    router_flops = router_flops_per_token(router, test_lp.shape[2])
    return [
        _cluster_score(
            test_lp,
            (cluster_prior_of(distances, router, k), router_flops),
            names,
            flops,
            settings,
            k,
        )
        for k in ks
    ]


def compute_router(
    layout: RunLayout, plan: Plan, members: dict[str, str], settings: EvaluationConfig
) -> ClusterRouter | None:
    """The cluster router of these members: prior cluster's (its errors are the user's), else,
    for the `cluster` rows, the one of a run that discovered tf-idf clusters every member was
    trained on (None for any other run)."""
    if settings.prior_choice.kind == "cluster":
        return load_router(layout, plan, members, settings)
    if not layout.discovery_record.is_file():
        return None
    try:
        return load_router(
            layout, plan, members, settings.model_copy(update={"cluster_top_k": None})
        )
    except SpecError:
        return None


def compute_results(
    config: ExperimentConfig,
    layout: RunLayout,
    plan: Plan,
    cache: LogProbCache,
    domains: list[str],
) -> ComputeResults:
    """Perplexity and forward FLOPs per scored token of every configuration's final ensemble:
    dense, best single member, each routing setting, and (members: all) the latest-per-lane
    ensemble the forest grew from. Every log-prob it reads is already in `cache`."""
    settings = config.evaluation
    seq_len = config.data.seq_len
    flops_of: dict[str, float] = {}
    section = ComputeResults(
        members=settings.members,
        routing=settings.routing,
        route_tokens=settings.route_tokens if settings.routing in ("prefix", "budget") else 0,
        prior=settings.prior,
        cluster_temperature=settings.cluster_temperature,
        configurations={},
    )
    for name in plan.configurations:
        iteration, members, _ = select_members(plan, name, settings)
        names, job_ids = list(members), list(members.values())
        for job in job_ids:
            if job not in flops_of:
                flops_of[job] = member_flops(layout, job, seq_len)
        flops = [flops_of[job] for job in job_ids]
        latest = None
        if settings.members == "all":
            latest_keys = settings.model_copy(update={"members": "latest"})
            latest = select_members(plan, name, latest_keys, iteration)[1]
        router = compute_router(layout, plan, members, settings)
        per_domain: dict[str, DomainCompute] = {}
        for domain in domains:
            entry = _domain_compute(cache, members, domain, settings, flops, router)
            if latest is not None:
                entry.latest = _latest_score(
                    cache, list(latest.values()), domain, settings, flops_of, layout, plan
                )
            per_domain[domain] = entry
        section.configurations[name] = ConfigurationCompute(
            iteration=iteration,
            members=members,
            flops_per_token=dict(zip(names, flops, strict=True)),
            domains=per_domain,
        )
    return section


def _domain_compute(
    cache: LogProbCache,
    members: dict[str, str],
    domain: str,
    settings: EvaluationConfig,
    flops: list[float],
    router: ClusterRouter | None,
) -> DomainCompute:
    """One ensemble's systems on one domain: full, best single, routed and cluster rows."""
    names, job_ids = list(members), list(members.values())
    test_lp = torch.stack([cache.get(job, domain, "test") for job in job_ids])
    distances = cluster_distances_of(cache, domain, router) if router is not None else None
    cluster = None
    if settings.prior_choice.kind == "cluster":
        assert router is not None and distances is not None
        router_flops = router_flops_per_token(router, test_lp.shape[2])
        cluster = (cluster_prior_of(distances, router, router.top_k), router_flops)
        dense = cluster_prior_of(distances, router, None)
        full = cluster_mixture(test_lp, dense, settings.posterior, "none", router.route_tokens)[0]
        full_score = _compute_score(
            full,
            sum(flops) + router_flops,
            experts=len(job_ids),
            router_flops_per_token=router_flops,
        )
        log_prior = None
    else:
        log_prior = spec_log_prior(cache, job_ids, domain, settings)
        full = mixture_log_probs(test_lp.double(), log_prior, settings.posterior)
        full_score = _compute_score(full, sum(flops), experts=len(job_ids))
    singles = [perplexity(test_lp[j]) for j in range(len(job_ids))]
    best = min(range(len(job_ids)), key=lambda j: singles[j])
    return DomainCompute(
        full=full_score,
        best_single=_compute_score(
            test_lp[best], flops[best], experts=1, member=names[best], job_id=job_ids[best]
        ),
        routed=routed_scores(test_lp, log_prior, names, flops, settings, cluster),
        cluster=(
            cluster_scores(test_lp, distances, router, names, flops, settings)
            if router is not None and distances is not None
            else []
        ),
    )


def _latest_score(
    cache: LogProbCache,
    job_ids: list[str],
    domain: str,
    settings: EvaluationConfig,
    flops_of: dict[str, float],
    layout: RunLayout,
    plan: Plan,
) -> RoutedScore:
    """The dense latest-per-lane ensemble a forest grew from, on one domain."""
    lp = torch.stack([cache.get(job, domain, "test") for job in job_ids])
    dense_flops = sum(flops_of[job] for job in job_ids)
    if settings.prior_choice.kind == "cluster":
        members = {job: job for job in job_ids}
        router = load_router(layout, plan, members, settings)
        distances = cluster_distances_of(cache, domain, router)
        mixed = cluster_mixture(
            lp,
            cluster_prior_of(distances, router, None),
            settings.posterior,
            "none",
            router.route_tokens,
        )[0]
        router_flops = router_flops_per_token(router, lp.shape[2])
        return _compute_score(
            mixed,
            dense_flops + router_flops,
            experts=len(job_ids),
            router_flops_per_token=router_flops,
        )
    log_prior = spec_log_prior(cache, job_ids, domain, settings)
    return _compute_score(
        mixture_log_probs(lp.double(), log_prior, settings.posterior),
        dense_flops,
        experts=len(job_ids),
    )


# ----------------------------------------------------------------------------------------------
# Paired uncertainty (hdee.uncertainty): which document each test window comes from


def test_window_documents(
    layout: RunLayout, cache: LogProbCache, domains: list[str]
) -> dict[str, np.ndarray | None]:
    """Domain -> the document of each test window, from the EOS tokens of the prepared split
    (None where the manifest names no EOS token: the bootstrap then resamples windows)."""
    documents: dict[str, np.ndarray | None] = {}
    for domain in domains:
        eos = read_json(layout.manifest(domain, "test")).get("eos_token_id")
        tokens, count, _ = cache.windows(domain, "test")
        documents[domain] = (
            None if eos is None else window_documents(tokens, cache.seq_len, count, int(eos))
        )
    return documents


# ----------------------------------------------------------------------------------------------
# results.csv


def results_rows(results: EvaluationResults) -> Iterator[dict[str, Any]]:
    """One tidy row per configuration / iteration / domain / method (single experts: one row
    per expert, `expert` naming its lane)."""
    for name, configuration in results.configurations.items():
        for iteration, entry in configuration.iterations.items():
            for domain, scores in entry.domains.items():
                base = {
                    "configuration": name,
                    "iteration": iteration,
                    "domain": domain,
                    "domain_kind": results.domains[domain].kind,
                }
                for method, score in scores.methods.items():
                    uses_posterior = method in METHODS and METHODS[method].uses_posterior
                    yield {
                        **base,
                        "method": method,
                        "expert": score.expert or "",
                        "job_id": score.job_id or "",
                        "perplexity": score.perplexity,
                        "tokens": score.tokens,
                        "posterior": results.posterior if uses_posterior else "",
                    }
                for lane, score in (scores.single_experts or {}).items():
                    yield {
                        **base,
                        "method": "single_expert",
                        "expert": lane,
                        "job_id": score.job_id or "",
                        "perplexity": score.perplexity,
                        "tokens": score.tokens,
                        "posterior": "",
                    }


def results_csv(results: EvaluationResults) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in results_rows(results):
        row = dict(row)
        if isinstance(row["perplexity"], float) and math.isfinite(row["perplexity"]):
            row["perplexity"] = f"{row['perplexity']:.8g}"
        writer.writerow(row)
    return buffer.getvalue()
