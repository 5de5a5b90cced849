"""The report's counting: best configuration per domain, heterogeneous wins, ties."""

from __future__ import annotations

from hdee.records import EvaluationResults
from hdee.report import best_per_domain, final_perplexities, heterogeneous_wins

TABLE = {
    "MHo-IHo": {"math": 32.0, "law": 10.0, "wiki": 20.0},
    "MHo-IHe": {"math": 31.5, "law": 10.5, "wiki": 20.0},
    "MHe-IHo": {"math": 31.8, "law": 10.2, "wiki": 19.9999},
}


def test_best_per_domain_and_wins():
    best = best_per_domain(TABLE, "MHo-IHo")
    assert best["math"] == "MHo-IHe"
    assert best["law"] == "MHo-IHo"
    # 19.9999 vs 20.0 is a tie within 0.01%: no win for a heterogeneous configuration.
    assert best["wiki"] == "MHo-IHo"
    assert heterogeneous_wins(TABLE, "MHo-IHo") == (1, 3)


def test_a_clear_margin_is_a_win():
    table = {**TABLE, "MHe-IHo": {**TABLE["MHe-IHo"], "wiki": 19.0}}
    assert best_per_domain(table, "MHo-IHo")["wiki"] == "MHe-IHo"
    assert heterogeneous_wins(table, "MHo-IHo") == (2, 3)


def test_final_perplexities_reads_the_last_iteration():
    def iteration(perplexity: float) -> dict:
        score = {"perplexity": perplexity, "tokens": 10}
        return {"experts": {}, "domains": {"x": {"methods": {"uniform_prior": score}}}}

    results = EvaluationResults.model_validate(
        {
            "posterior": "prefix",
            "methods": ["uniform_prior"],
            "seq_len": 8,
            "cached_prior_decay": 0.3,
            "device": "cpu",
            "domains": {"x": {"kind": "trained", "test_windows": 1}},
            "configurations": {
                "A": {
                    "final_iteration": 2,
                    "iterations": {"1": iteration(9.0), "2": iteration(7.0)},
                }
            },
        }
    )
    assert final_perplexities(results, "uniform_prior") == {"A": {"x": 7.0}}
    assert final_perplexities(results, "cached_prior") == {"A": {}}
