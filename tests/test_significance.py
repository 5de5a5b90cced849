"""The report's reading of paired intervals (hdee.significance), on hand-made intervals: win or
loss only where the whole interval lies beyond the equivalence margin, equivalent where it lies
within it, undecided otherwise; the best group of a domain."""

from __future__ import annotations

import math

import pytest

from hdee.records import DomainResampling, PairedDifference, Uncertainty
from hdee.significance import (
    Outcome,
    against_reference_table,
    best_group,
    classify,
    classify_relative,
    configuration_outcomes,
    method_outcomes,
    relative_change,
    tally,
)

MARGIN = 0.005


@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [
        (-0.002, 0.003, "equivalent"),  # inside the margin
        (-0.005, 0.005, "equivalent"),  # exactly on both edges: the edges are within
        (0.0, 0.0, "equivalent"),  # a shared lane: certain, and no difference
        (-0.03, -0.01, "win"),  # beyond the margin, below
        (0.01, 0.03, "loss"),  # beyond the margin, above
        (-0.03, -0.005, "undecided"),  # ends exactly on the edge: not wholly beyond it
        (-0.03, -0.004, "undecided"),  # straddles the lower edge
        (0.004, 0.02, "undecided"),  # straddles the upper edge
        (-0.02, 0.02, "undecided"),  # straddles both
        (-0.004, -0.001, "equivalent"),  # certainly better, but by less than the margin
    ],
)
def test_three_way_classification_of_synthetic_intervals(low, high, verdict):
    assert classify_relative(low, high, MARGIN) == verdict


def test_with_no_margin_a_win_needs_the_interval_to_exclude_zero():
    assert classify_relative(-0.3, -1e-9, 0.0) == "win"
    assert classify_relative(-0.3, 0.0, 0.0) == "undecided"  # touching zero is no win
    assert classify_relative(1e-9, 0.3, 0.0) == "loss"


def test_classification_rejects_a_reversed_interval_or_a_negative_margin():
    with pytest.raises(ValueError, match="low end above"):
        classify_relative(0.1, -0.1, MARGIN)
    with pytest.raises(ValueError, match="margin"):
        classify_relative(-0.1, 0.1, -0.01)


def pair(reference: str, candidate: str, low: float, high: float, **where) -> PairedDifference:
    """An interval given as relative perplexity differences (stored as log differences)."""
    where = {"domain": "law", "method": "uniform_prior", **where}
    log_low, log_high = math.log1p(low), math.log1p(high)
    return PairedDifference(
        reference=reference,
        candidate=candidate,
        delta=(log_low + log_high) / 2,
        low=log_low,
        high=log_high,
        **where,
    )


def test_classify_reads_log_differences_as_relative_perplexity():
    assert classify(pair("a", "b", -0.03, -0.01), MARGIN) == "win"
    assert classify(pair("a", "b", -0.004, 0.004), MARGIN) == "equivalent"
    assert classify(pair("a", "b", 0.01, 0.02), MARGIN) == "loss"


def test_a_winner_wins_against_every_other_system_whichever_way_round_the_pair_is():
    # b is better than a (a, b: below) and than c (b, c: c worse).
    pairs = [pair("a", "b", -0.3, -0.1), pair("b", "c", 0.05, 0.2), pair("a", "c", -0.1, 0.1)]
    assert best_group(pairs, ["a", "b", "c"], MARGIN) == Outcome(("b",), "win")
    assert best_group(pairs, ["b", "a"], MARGIN).winner == "b"
    # a vs c straddles the margin: tied best, undecided.
    assert best_group(pairs, ["a", "c"], MARGIN) == Outcome(("a", "c"), "undecided")


def test_grouping_on_a_hand_built_case():
    # Two near-identical posterior methods and a simple average that is clearly better than
    # neither: one group, not two "losses".
    pairs = [
        pair("uniform", "cached", -0.001, 0.001),  # equivalent
        pair("uniform", "average", -0.02, 0.001),  # undecided: reaches across -0.5%
        pair("cached", "average", -0.02, 0.002),  # undecided
        pair("uniform", "single", 0.05, 0.09),  # the single expert is clearly worse
        pair("cached", "single", 0.05, 0.09),
        pair("average", "single", 0.06, 0.1),
    ]
    systems = ["uniform", "cached", "average", "single"]
    outcome = best_group(pairs, systems, MARGIN)
    assert outcome == Outcome(("uniform", "cached", "average"), "undecided")
    assert outcome.winner is None
    assert outcome.describe() == "tied best (undecided): uniform, cached, average"
    # Without the simple average, the two posterior methods are equivalent.
    both = best_group(pairs, ["uniform", "cached", "single"], MARGIN)
    assert both == Outcome(("uniform", "cached"), "equivalent")
    assert both.describe() == "tied best (equivalent): uniform, cached"
    # A margin of zero changes nothing here but the equivalence: it needs an exact zero.
    assert best_group(pairs, ["uniform", "cached"], 0.0).verdict == "undecided"


def test_a_missing_pair_keeps_a_system_in_the_best_group():
    outcome = best_group([pair("a", "b", -0.3, -0.1)], ["a", "b", "c"], MARGIN)
    assert outcome.best == ("b", "c") and outcome.verdict == "undecided"
    assert best_group([], ["a"], MARGIN) == Outcome(("a",), "win")  # alone, nothing to beat


def uncertainty(configurations=(), methods=()) -> Uncertainty:
    return Uncertainty(
        resamples=100,
        level=0.95,
        seed=0,
        domains={
            "law": DomainResampling(unit="documents", units=12),
            "math": DomainResampling(unit="windows", units=30),
        },
        configurations=list(configurations),
        methods=list(methods),
    )


def test_configuration_and_method_outcomes_read_their_own_pairs_only():
    u = uncertainty(
        configurations=[
            pair("MHo", "MHe", -0.3, -0.1),  # law, uniform_prior: MHe wins
            pair("MHo", "MHe", 0.1, 0.3, domain="math"),  # math: MHo wins
            pair("MHo", "MHe", 0.1, 0.3, method="cached_prior"),  # another method
        ],
        methods=[
            pair("uniform_prior", "cached_prior", -0.2, -0.1, method=None, configuration="MHe"),
            pair("uniform_prior", "cached_prior", 0.1, 0.2, method=None, configuration="MHo"),
        ],
    )
    names = ["MHo", "MHe"]
    by_domain = configuration_outcomes(u, "uniform_prior", names, ["law", "math"], MARGIN)
    assert {d: o.winner for d, o in by_domain.items()} == {"law": "MHe", "math": "MHo"}
    cached = configuration_outcomes(u, "cached_prior", names, ["law", "math"], MARGIN)
    assert cached["law"].winner == "MHo"
    assert cached["math"] == Outcome(("MHo", "MHe"), "undecided")  # no interval there
    methods = ["uniform_prior", "cached_prior"]
    within = method_outcomes(u, "MHe", methods, ["law", "math"], MARGIN)
    assert within["law"].winner == "cached_prior" and within["math"].winner is None
    assert method_outcomes(u, "MHo", methods, ["law"], MARGIN)["law"].winner == "uniform_prior"


def test_tally_counts_wins_and_groups_the_ties():
    outcomes = {
        "law": Outcome(("MHe",), "win"),
        "math": Outcome(("MHe",), "win"),
        "code": Outcome(("MHo", "MHe"), "equivalent"),
        "news": Outcome(("MHo",), "win"),
        "web": Outcome(("MHo", "MHe"), "undecided"),
        "wiki": Outcome(("MHo", "MHe"), "undecided"),
    }
    assert tally(outcomes, ["MHo", "MHe"]) == (
        "MHo wins 1 of 6 domains, MHe wins 2 of 6 domains; tied best: "
        "MHo, MHe (undecided) in 2 domains; MHo, MHe (equivalent) in 1 domain"
    )
    assert tally({"a": Outcome(("x",), "win")}, ["x"]) == "x wins 1 of 1 domains; no ties"


def test_relative_change_is_the_perplexity_ratio_in_percent():
    p = pair("a", "b", -0.5, 0.25)
    p = p.model_copy(update={"delta": math.log(0.9)})
    assert relative_change(p) == "-10.0% [-50.0, +25.0]"


def test_the_table_against_a_reference_gives_each_verdict_and_bolds_wins_and_losses():
    u = uncertainty(
        configurations=[
            pair("MHo", "MHe", -0.1, -0.05),  # win
            pair("MHo", "MHe", -0.01, 0.02, domain="math"),  # undecided
            pair("MHo", "X", 0.01, 0.05, domain="math"),  # loss
            pair("MHo", "X", -0.001, 0.001),  # equivalent
            pair("MHe", "X", -0.9, -0.5),  # another reference: not in the table
            pair("MHo", "MHe", -0.5, -0.4, method="cached_prior"),  # another method
        ]
    )
    lines = against_reference_table(u, "uniform_prior", "MHo", ["law", "math", "code"], MARGIN)
    assert lines[0] == "| domain | unit | MHe vs MHo | X vs MHo |"
    assert lines[1] == "| --- | --- | ---: | ---: |"
    c = [relative_change(p) for p in u.configurations]
    assert lines[2] == f"| law | 12 documents | **{c[0]} win** | {c[3]} equivalent |"
    assert lines[3] == f"| math | 30 windows | {c[1]} undecided | **{c[2]} loss** |"
    assert lines[4] == "| code | – | – | – |"
    assert len(lines) == 5
    assert against_reference_table(u, "simple_average", "MHo", ["law"], MARGIN) == []
