"""The evaluation's confidence intervals (results.json `uncertainty`) and the cached prior's
two update rules, on test_evaluate's tiny fake run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hdee.ensemble import cached_prior, estimate_last_token_prior
from hdee.layout import RunLayout
from hdee.records import EvaluationResults
from test_evaluate import evaluate, make_config, run_dir  # noqa: F401  (run_dir: a fixture)


def test_every_pair_has_an_interval_around_the_reported_difference(run_dir: Path) -> None:  # noqa: F811
    evaluate(run_dir, make_config(run_dir, bootstrap_resamples=200))
    results = EvaluationResults.read(RunLayout.of(run_dir).results)
    uncertainty = results.uncertainty
    assert uncertainty is not None and uncertainty.resamples == 200 and uncertainty.level == 0.95
    assert set(uncertainty.domains) == {"alpha", "beta", "gamma"}
    for domain, resampling in uncertainty.domains.items():
        assert resampling.unit in ("documents", "windows")
        assert 1 <= resampling.units <= results.domains[domain].test_windows
    methods = ["uniform_prior", "cached_prior", "simple_average", "best_single"]
    # Configurations: the baseline is the reference of its pairs; one pair per method and domain.
    assert len(uncertainty.configurations) == 3 * len(methods)
    for pair in uncertainty.configurations:
        assert (pair.reference, pair.candidate) == ("homo", "hetero")
        final = {n: c.final.domains[pair.domain] for n, c in results.configurations.items()}
        reported = math.log(final["hetero"].methods[pair.method].perplexity) - math.log(
            final["homo"].methods[pair.method].perplexity
        )
        # The re-mixed window sums are the evaluation's own numbers.
        assert pair.delta == pytest.approx(reported, abs=1e-9)
        assert pair.low <= pair.delta <= pair.high
    # Methods: every pair of the four, per configuration and domain.
    assert len(uncertainty.methods) == 2 * 3 * 6
    for pair in uncertainty.methods:
        scores = results.configurations[pair.configuration].final.domains[pair.domain].methods
        reported = math.log(scores[pair.candidate].perplexity) - math.log(
            scores[pair.reference].perplexity
        )
        assert pair.delta == pytest.approx(reported, abs=1e-9)


def test_no_intervals_when_resampling_is_off(run_dir: Path) -> None:  # noqa: F811
    results = evaluate(run_dir, make_config(run_dir, bootstrap_resamples=0))
    assert "uncertainty" not in results


def test_last_token_prior_starts_from_the_first_observation() -> None:
    # One validation window: the DEMix-code prior is that window's last-token posterior
    # exactly, where the whole-window EWMA still keeps (1 - a) of the uniform start.
    lp = torch.log(torch.tensor([[[0.5, 0.9]], [[0.5, 0.1]]]))  # [E=2, N=1, T=2]
    last = cached_prior(lp, 0.3, "last_token")
    assert last.tolist() == pytest.approx([0.9, 0.1])
    window = cached_prior(lp, 0.3, "window")
    posterior = torch.softmax(lp.sum(dim=2).T[0].double(), dim=0)
    assert window.tolist() == pytest.approx((0.7 * 0.5 + 0.3 * posterior).tolist())
    # Two windows: pi_2 = 0.7 * posterior_1 + 0.3 * posterior_2.
    two = estimate_last_token_prior(torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]])), 0.3)
    assert two.tolist() == pytest.approx([0.7 * 0.9 + 0.3 * 0.2, 0.7 * 0.1 + 0.3 * 0.8])
    with pytest.raises(ValueError, match="cached prior update"):
        cached_prior(lp, 0.3, "every_token")  # type: ignore[arg-type]


def test_the_results_say_which_prior_update_was_used(run_dir: Path) -> None:  # noqa: F811
    window = evaluate(run_dir, make_config(run_dir, bootstrap_resamples=0))
    last = evaluate(
        run_dir, make_config(run_dir, bootstrap_resamples=0, cached_prior_update="last_token")
    )
    assert window["cached_prior_update"] == "window"
    assert last["cached_prior_update"] == "last_token"
    domain = window["configurations"]["homo"]["iterations"]["1"]["domains"]["alpha"]
    other = last["configurations"]["homo"]["iterations"]["1"]["domains"]["alpha"]
    assert domain["cached_prior"] != other["cached_prior"]
