"""The report's reading of paired intervals (hdee.significance), on hand-made intervals: a win
only where the whole interval is on one side of zero against every other system; ties as ties."""

from __future__ import annotations

import math

from hdee.records import DomainResampling, PairedDifference, Uncertainty
from hdee.significance import (
    against_reference_table,
    configuration_winners,
    method_winners,
    relative_change,
    significant_winner,
    tally,
)


def pair(reference: str, candidate: str, low: float, high: float, **where) -> PairedDifference:
    where = {"domain": "law", "method": "uniform_prior", **where}
    return PairedDifference(
        reference=reference,
        candidate=candidate,
        delta=(low + high) / 2,
        low=low,
        high=high,
        **where,
    )


def test_a_winner_beats_every_other_system_whichever_way_round_the_pair_is():
    # b is better than a (a, b: interval below 0) and than c (b, c: interval above 0).
    pairs = [pair("a", "b", -0.3, -0.1), pair("b", "c", 0.05, 0.2), pair("a", "c", -0.1, 0.1)]
    assert significant_winner(pairs, ["a", "b", "c"]) == "b"
    assert significant_winner(pairs, ["a", "c"]) is None  # a vs c crosses zero: a tie
    assert significant_winner(pairs, ["b", "a"]) == "b"


def test_an_interval_touching_zero_is_not_a_win():
    assert significant_winner([pair("a", "b", -0.3, 0.0)], ["a", "b"]) is None
    assert significant_winner([pair("a", "b", 0.0, 0.3)], ["a", "b"]) is None
    assert significant_winner([pair("a", "b", 1e-9, 0.3)], ["a", "b"]) == "a"
    assert significant_winner([pair("a", "b", -0.3, -1e-9)], ["a", "b"]) == "b"


def test_a_missing_pair_is_never_a_win():
    assert significant_winner([pair("a", "b", -0.3, -0.1)], ["a", "b", "c"]) is None
    assert significant_winner([], ["a"]) == "a"  # alone, nothing to beat


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


def test_configuration_and_method_winners_read_their_own_pairs_only():
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
    assert configuration_winners(u, "uniform_prior", names, ["law", "math"]) == {
        "law": "MHe",
        "math": "MHo",
    }
    assert configuration_winners(u, "cached_prior", names, ["law", "math"]) == {
        "law": "MHo",
        "math": None,
    }
    methods = ["uniform_prior", "cached_prior"]
    assert method_winners(u, "MHe", methods, ["law", "math"]) == {
        "law": "cached_prior",
        "math": None,
    }
    assert method_winners(u, "MHo", methods, ["law"]) == {"law": "uniform_prior"}


def test_tally_counts_wins_and_ties():
    winners = {"law": "MHe", "math": "MHe", "code": None, "news": "MHo"}
    assert tally(winners, ["MHo", "MHe"]) == (
        "MHo best in 1 of 4 domains (significant), MHe best in 2 of 4 domains (significant); 1 tie"
    )
    assert tally({"a": None, "b": None}, ["x"]).endswith(
        "x best in 0 of 2 domains (significant); 2 ties"
    )
    assert tally({"a": "x"}, ["x"]).endswith("; 0 ties")


def test_relative_change_is_the_perplexity_ratio_in_percent():
    p = pair("a", "b", math.log(0.5), math.log(1.25))
    p = p.model_copy(update={"delta": math.log(0.9)})
    assert relative_change(p) == "-10.0% [-50.0, +25.0]"


def test_the_table_against_a_reference_marks_significant_differences_in_bold():
    u = uncertainty(
        configurations=[
            pair("MHo", "MHe", math.log(0.9), math.log(0.95)),
            pair("MHo", "MHe", math.log(0.99), math.log(1.02), domain="math"),
            pair("MHo", "X", math.log(1.01), math.log(1.05), domain="math"),
            pair("MHe", "X", -1.0, -0.5),  # another reference: not in the table
            pair("MHo", "MHe", -1.0, -0.5, method="cached_prior"),  # another method
        ]
    )
    lines = against_reference_table(u, "uniform_prior", "MHo", ["law", "math", "code"])
    assert lines[0] == "| domain | unit | MHe vs MHo | X vs MHo |"
    assert lines[1] == "| --- | --- | ---: | ---: |"
    law = relative_change(u.configurations[0])
    math_cells = [relative_change(u.configurations[1]), relative_change(u.configurations[2])]
    assert lines[2] == f"| law | 12 documents | **{law}** | – |"
    assert lines[3] == f"| math | 30 windows | {math_cells[0]} | **{math_cells[1]}** |"
    assert lines[4] == "| code | – | – | – |"
    assert len(lines) == 5
    assert against_reference_table(u, "simple_average", "MHo", ["law"]) == []


def test_an_interval_that_touches_zero_is_not_bold():
    touching = uncertainty(configurations=[pair("MHo", "A", -0.2, 0.0), pair("MHo", "B", 0.0, 0.2)])
    row = against_reference_table(touching, "uniform_prior", "MHo", ["law"])[2]
    assert "**" not in row
