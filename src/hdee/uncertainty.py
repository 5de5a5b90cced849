"""Confidence intervals for the evaluation's comparisons (the `uncertainty` of results.json).

For every domain, every pair of configurations (per method) and every pair of methods (per
configuration) of the final ensembles, a paired bootstrap (hdee.statistics) of the difference
in log perplexity. The per-window summed log-probs of each method are re-mixed from the cached
label log-probs exactly as `evaluate.evaluate_ensemble_on_domain` mixes them (cheap: no model
runs). One resampling plan per domain is shared by all of that domain's pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import combinations

import numpy as np
import torch
from torch import Tensor

from hdee.config import EvaluationConfig
from hdee.ensemble import METHODS, MixInputs, cached_prior, mixture_log_probs
from hdee.ensemble_spec import select_members
from hdee.records import (
    DomainResampling,
    EvaluationResults,
    OptOut,
    OptOutDomain,
    PairedDifference,
    Plan,
    Uncertainty,
)
from hdee.statistics import bootstrap_weights, paired_interval, resampling_units

LogProbs = Callable[[str, str, str], Tensor]  # (job id, domain, split) -> [windows, seq_len]


def compared_methods(scored: Iterable[str]) -> list[str]:
    """The methods of `scored` in the method table's order: the earlier of a pair is the
    reference of its interval."""
    present = set(scored)
    return [name for name in METHODS if name in present]


def method_window_sums(
    test_lp: Tensor,
    validation_lp: Tensor | None,
    methods: list[str],
    settings: EvaluationConfig,
) -> dict[str, np.ndarray]:
    """Summed label log-prob of each test window `[N]` under each method in `methods`, from
    the members' label log-probs `[E, N, T]`, mixed by the method table exactly as
    `hdee evaluate` scores them."""
    inputs = MixInputs.of(test_lp, validation_lp, settings)
    return {
        method: METHODS[method].mix(inputs).log_probs.to(torch.float64).sum(dim=1).numpy()
        for method in methods
    }


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
            methods = compared_methods(scores.methods)
            job_ids = list(final.experts.values())
            test_lp = torch.stack([log_probs(job, domain, "test") for job in job_ids])
            validation_lp = (
                torch.stack([log_probs(job, domain, "validation") for job in job_ids])
                if any(METHODS[m].needs_validation for m in methods)
                else None
            )
            sums = method_window_sums(test_lp, validation_lp, methods, settings)
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
        for method in compared_methods(m for n in names for m in per_configuration[n]):
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


def opt_out_results(
    plan: Plan,
    results: EvaluationResults,
    log_probs: LogProbs,
    documents: dict[str, np.ndarray | None],
    settings: EvaluationConfig,
    seed: int,
) -> list[OptOut]:
    """For every name of `settings.opt_out` and every configuration's final ensemble: each
    domain's perplexity with and without the members that name withdraws (the dense posterior
    with the ensemble keys' prior), and the paired interval of the change."""
    studies = []
    for withdrawn in settings.opt_out:
        without_keys = settings.model_copy(update={"exclude": [*settings.exclude, withdrawn]})
        for name, configuration in results.configurations.items():
            members = configuration.final.experts
            _, kept, _ = select_members(plan, name, without_keys, configuration.final_iteration)
            excluded = {m: job for m, job in members.items() if m not in kept}
            study = OptOut(withdrawn=withdrawn, configuration=name, excluded=excluded, domains={})
            for index, domain in enumerate(results.domains):
                sums = [
                    _dense_window_sums(log_probs, list(jobs.values()), domain, settings)
                    for jobs in (members, kept)
                ]
                windows = results.domains[domain].test_windows
                _, clusters = resampling_units(documents.get(domain), windows)
                weights = bootstrap_weights(
                    clusters, settings.bootstrap_resamples or 1000, (seed % 2**32) * 1009 + index
                )
                labels = np.full(windows, results.seq_len, dtype=np.float64)
                interval = paired_interval(sums[0], sums[1], labels, weights, settings.confidence)
                tokens = labels.sum()
                study.domains[domain] = OptOutDomain(
                    with_members=float(np.exp(-sums[0].sum() / tokens)),
                    without_members=float(np.exp(-sums[1].sum() / tokens)),
                    delta=interval.delta,
                    low=interval.low,
                    high=interval.high,
                )
            studies.append(study)
    return studies


def _dense_window_sums(
    log_probs: LogProbs, job_ids: list[str], domain: str, settings: EvaluationConfig
) -> np.ndarray:
    """Summed label log-prob of each test window under the dense posterior of these members,
    with the ensemble keys' prior (uniform, or a domain's cached prior; explicit weights are
    refused for opt-out by the config)."""
    test_lp = torch.stack([log_probs(job, domain, "test") for job in job_ids])
    prior = settings.prior_choice
    log_prior = None
    if prior.kind == "cached":
        validation = torch.stack(
            [log_probs(job, prior.domain or domain, "validation") for job in job_ids]
        )
        log_prior = cached_prior(
            validation, settings.cached_prior_decay, settings.cached_prior_update
        ).log()
    # As the posterior methods mix (in the cached log-probs' float32), so "with" is the very
    # perplexity the report's tables give the ensemble.
    mixed = mixture_log_probs(test_lp, log_prior, settings.posterior)
    return mixed.to(torch.float64).sum(dim=1).numpy()
