"""Confidence intervals for the evaluation's comparisons (the `uncertainty` of results.json).

For every domain, every pair of configurations (per method) and every pair of methods (per
configuration) of the final ensembles, a paired bootstrap (hdee.statistics) of the difference
in log perplexity. The per-window summed log-probs of each method are re-mixed from the cached
label log-probs exactly as `evaluate.evaluate_ensemble_on_domain` mixes them (cheap: no model
runs). One resampling plan per domain is shared by all of that domain's pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import numpy as np
import torch
from torch import Tensor

from hdee.config import EvaluationConfig
from hdee.ensemble import cached_prior, mixture_log_probs, simple_average
from hdee.records import (
    DomainResampling,
    EvaluationResults,
    PairedDifference,
    Plan,
    Uncertainty,
)
from hdee.statistics import bootstrap_weights, paired_interval, resampling_units

# Compared in this order: the earlier of a pair is the reference.
COMPARED_METHODS = ("uniform_prior", "cached_prior", "simple_average", "best_single")

LogProbs = Callable[[str, str, str], Tensor]  # (job id, domain, split) -> [windows, seq_len]


def method_window_sums(
    test_lp: Tensor,
    validation_lp: Tensor | None,
    methods: list[str],
    best_lane: int | None,
    settings: EvaluationConfig,
) -> dict[str, np.ndarray]:
    """Summed label log-prob of each test window `[N]` under each method in `methods`, from
    the members' label log-probs `[E, N, T]` (best_single: the member `best_lane`)."""
    sums: dict[str, Tensor] = {}
    for method in methods:
        if method == "simple_average":
            mixed = simple_average(test_lp)
        elif method == "uniform_prior":
            mixed = mixture_log_probs(test_lp, None, settings.posterior)
        elif method == "cached_prior":
            assert validation_lp is not None
            prior = cached_prior(
                validation_lp, settings.cached_prior_decay, settings.cached_prior_update
            )
            mixed = mixture_log_probs(test_lp, prior.log(), settings.posterior)
        elif method == "best_single":
            assert best_lane is not None
            mixed = test_lp[best_lane]
        else:
            raise ValueError(f"no window sums for method {method!r}")
        sums[method] = mixed.to(torch.float64).sum(dim=1)
    return {method: value.numpy() for method, value in sums.items()}


def paired_uncertainty(
    plan: Plan,
    results: EvaluationResults,
    log_probs: LogProbs,
    documents: dict[str, np.ndarray | None],
    settings: EvaluationConfig,
    seed: int,
) -> Uncertainty:
    """Intervals for every pair on every domain of `results` (final iterations only).

    `documents[domain]` is the document of each test window (`statistics.window_documents`),
    or None when unknown: then the windows themselves are resampled.
    """
    names = [plan.baseline] + [n for n in results.configurations if n != plan.baseline]
    uncertainty = Uncertainty(
        resamples=settings.bootstrap_resamples,
        level=settings.confidence,
        seed=seed,
        domains={},
        configurations=[],
        methods=[],
    )
    for domain_index, domain in enumerate(results.domains):
        windows = results.domains[domain].test_windows
        unit, clusters = resampling_units(documents.get(domain), windows)
        uncertainty.domains[domain] = DomainResampling(unit=unit, units=int(clusters.max()) + 1)
        # A seed per domain (same for every pair on it), so domains are independent draws.
        weights = bootstrap_weights(
            clusters, settings.bootstrap_resamples, (seed % 2**32) * 1009 + domain_index
        )
        labels = np.full(windows, results.seq_len, dtype=np.float64)

        per_configuration: dict[str, dict[str, np.ndarray]] = {}
        for name in names:
            final = results.configurations[name].final
            scores = final.domains[domain]
            methods = [m for m in COMPARED_METHODS if m in scores.methods]
            lanes, job_ids = list(final.experts), list(final.experts.values())
            test_lp = torch.stack([log_probs(job, domain, "test") for job in job_ids])
            validation_lp = (
                torch.stack([log_probs(job, domain, "validation") for job in job_ids])
                if "cached_prior" in methods
                else None
            )
            best = scores.methods.get("best_single")
            best_lane = lanes.index(best.expert) if best and best.expert else None
            sums = method_window_sums(test_lp, validation_lp, methods, best_lane, settings)
            per_configuration[name] = sums
            for reference, candidate in combinations(methods, 2):
                uncertainty.methods.append(
                    _paired_difference(
                        sums[reference],
                        sums[candidate],
                        labels,
                        weights,
                        settings.confidence,
                        domain=domain,
                        reference=reference,
                        candidate=candidate,
                        configuration=name,
                    )
                )
        for method in COMPARED_METHODS:
            having = [n for n in names if method in per_configuration[n]]
            for reference, candidate in combinations(having, 2):
                uncertainty.configurations.append(
                    _paired_difference(
                        per_configuration[reference][method],
                        per_configuration[candidate][method],
                        labels,
                        weights,
                        settings.confidence,
                        domain=domain,
                        reference=reference,
                        candidate=candidate,
                        method=method,
                    )
                )
    return uncertainty


def _paired_difference(
    reference_sums: np.ndarray,
    candidate_sums: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    confidence: float,
    **names: str,
) -> PairedDifference:
    """The record of one paired interval (`names`: domain, reference, candidate, and the
    configuration or method the pair shares)."""
    interval = paired_interval(reference_sums, candidate_sums, labels, weights, confidence)
    return PairedDifference(**names, delta=interval.delta, low=interval.low, high=interval.high)
