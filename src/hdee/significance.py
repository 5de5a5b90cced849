"""Wins that are not noise, and differences too small to matter: the report's reading of the
paired intervals in results.json.

Every comparison of two systems on a domain is one paired-bootstrap interval of the relative
perplexity difference, `ppl(candidate) / ppl(reference) - 1`, read against an equivalence
margin m (`evaluation.min_effect`, 0.005: half a percent of perplexity):

    win         the whole interval lies below -m   (the candidate is better, by more than m)
    loss        the whole interval lies above +m   (the candidate is worse, by more than m)
    equivalent  the whole interval lies within [-m, +m]   (the edges count as within)
    undecided   anything else: the interval reaches across a margin's edge

So a difference that is certain but smaller than m (two ensembles sharing a lane) is
"equivalent", not a win, and a win needs an effect of at least m that the data resolve. With
m = 0 a win is the old "the interval excludes zero".

On a domain, the systems compared (configurations, or methods) form one *best group*: the
leader (the system that wins against every other, else the one with the lowest perplexity)
and every system the leader does not beat. A group of one is a win; a larger group is "tied
best", equivalent when every member is equivalent to the leader, else undecided. Pure
functions over `records.Uncertainty`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from hdee.records import PairedDifference, Uncertainty

Verdict = Literal["win", "loss", "equivalent", "undecided"]
GroupVerdict = Literal["win", "equivalent", "undecided"]
_FLIPPED: dict[Verdict, Verdict] = {
    "win": "loss",
    "loss": "win",
    "equivalent": "equivalent",
    "undecided": "undecided",
}


def classify_relative(low: float, high: float, min_effect: float) -> Verdict:
    """The candidate's verdict from the interval [low, high] of its relative perplexity
    difference `ppl(candidate) / ppl(reference) - 1` and the margin `min_effect` (>= 0)."""
    if low > high:
        raise ValueError(f"interval [{low}, {high}] has its low end above its high end")
    if min_effect < 0:
        raise ValueError(f"the margin must be >= 0, got {min_effect}")
    if high < -min_effect:
        return "win"
    if low > min_effect:
        return "loss"
    if -min_effect <= low and high <= min_effect:
        return "equivalent"
    return "undecided"


def classify(pair: PairedDifference, min_effect: float) -> Verdict:
    """The candidate's verdict against the reference (`pair` holds log-perplexity
    differences; exp(x) - 1 is the relative difference)."""
    return classify_relative(math.expm1(pair.low), math.expm1(pair.high), min_effect)


Pairs = dict[tuple[str, str], PairedDifference]


def verdict_between(pairs: Pairs, system: str, other: str, min_effect: float) -> Verdict | None:
    """`system`'s verdict against `other` (their pair in either order; None: no pair)."""
    if (other, system) in pairs:  # system is the candidate
        return classify(pairs[(other, system)], min_effect)
    if (system, other) in pairs:  # system is the reference: the candidate's verdict flipped
        return _FLIPPED[classify(pairs[(system, other)], min_effect)]
    return None


@dataclass(frozen=True)
class Outcome:
    """One domain's reading: the best group (in the systems' order) and its verdict."""

    best: tuple[str, ...]
    verdict: GroupVerdict

    @property
    def winner(self) -> str | None:
        """The one system that wins against every other (None: a tie)."""
        return self.best[0] if self.verdict == "win" else None

    def describe(self) -> str:
        """'win: A', or 'tied best (equivalent): A, B', or 'tied best (undecided): A, B'."""
        if self.verdict == "win":
            return f"win: {self.best[0]}"
        return f"tied best ({self.verdict}): {', '.join(self.best)}"


def _leader(pairs: Pairs, systems: list[str], min_effect: float) -> str:
    """The system that wins against every other, else the lowest perplexity: the sum of its
    log-perplexity differences to the others (the first listed on equal sums)."""
    for system in systems:
        others = [o for o in systems if o != system]
        if all(verdict_between(pairs, system, o, min_effect) == "win" for o in others):
            return system

    def lead(system: str) -> float:
        total = 0.0
        for other in systems:
            if (other, system) in pairs:
                total += pairs[(other, system)].delta
            elif (system, other) in pairs:
                total -= pairs[(system, other)].delta
        return total

    return min(systems, key=lead)


def best_group(pairs: Iterable[PairedDifference], systems: list[str], min_effect: float) -> Outcome:
    """The best group among `systems` on one domain (`pairs`: that domain's intervals). A
    system without an interval against the leader cannot be ruled out: it stays in the group."""
    by_pair = {(p.reference, p.candidate): p for p in pairs}
    leader = _leader(by_pair, systems, min_effect)
    against = {s: verdict_between(by_pair, leader, s, min_effect) for s in systems if s != leader}
    best = tuple(s for s in systems if s == leader or against[s] != "win")
    if len(best) == 1:
        return Outcome(best, "win")
    equivalent = all(against[s] == "equivalent" for s in best if s != leader)
    return Outcome(best, "equivalent" if equivalent else "undecided")


def configuration_outcomes(
    uncertainty: Uncertainty, method: str, names: list[str], domains: list[str], min_effect: float
) -> dict[str, Outcome]:
    """Domain -> the best group of configurations under `method`."""
    return {
        domain: best_group(
            (p for p in uncertainty.configurations if p.domain == domain and p.method == method),
            names,
            min_effect,
        )
        for domain in domains
    }


def method_outcomes(
    uncertainty: Uncertainty,
    configuration: str,
    methods: list[str],
    domains: list[str],
    min_effect: float,
) -> dict[str, Outcome]:
    """Domain -> the best group of methods within `configuration`."""
    return {
        domain: best_group(
            (
                p
                for p in uncertainty.methods
                if p.domain == domain and p.configuration == configuration
            ),
            methods,
            min_effect,
        )
        for domain in domains
    }


def tally(outcomes: dict[str, Outcome], systems: list[str]) -> str:
    """'A wins 1 of 4 domains, B wins 2 of 4; tied best: A, B (equivalent) in 1 domain'."""
    total = len(outcomes)
    wins = [
        f"{system} wins {sum(o.winner == system for o in outcomes.values())} of {total} domains"
        for system in systems
    ]
    ties = Counter((o.best, o.verdict) for o in outcomes.values() if o.winner is None)
    if not ties:
        return ", ".join(wins) + "; no ties"
    groups = [
        f"{', '.join(best)} ({verdict}) in {count} domain{'s' if count != 1 else ''}"
        for (best, verdict), count in ties.most_common()
    ]
    return ", ".join(wins) + "; tied best: " + "; ".join(groups)


def relative_change(pair: PairedDifference) -> str:
    """The candidate's perplexity against the reference's as a percentage with its interval,
    e.g. '-1.2% [-2.0, -0.4]' (exp of the log-perplexity difference)."""

    def pct(value: float) -> float:
        return math.expm1(value) * 100

    return f"{pct(pair.delta):+.1f}% [{pct(pair.low):+.1f}, {pct(pair.high):+.1f}]"


def against_reference_table(
    uncertainty: Uncertainty, method: str, reference: str, domains: list[str], min_effect: float
) -> list[str]:
    """Markdown rows: each configuration's perplexity against `reference`, per domain, with its
    interval and verdict (win / loss / equivalent / undecided); a win or a loss in bold."""
    candidates = list(
        dict.fromkeys(
            p.candidate
            for p in uncertainty.configurations
            if p.method == method and p.reference == reference
        )
    )
    if not candidates:
        return []
    lines = [
        "| domain | unit | " + " | ".join(f"{c} vs {reference}" for c in candidates) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in candidates) + " |",
    ]
    for domain in domains:
        cells = []
        for candidate in candidates:
            pair = next(
                (
                    p
                    for p in uncertainty.configurations
                    if p.domain == domain
                    and p.method == method
                    and p.reference == reference
                    and p.candidate == candidate
                ),
                None,
            )
            if pair is None:
                cells.append("–")
                continue
            verdict = classify(pair, min_effect)
            text = f"{relative_change(pair)} {verdict}"
            cells.append(f"**{text}**" if verdict in ("win", "loss") else text)
        resampling = uncertainty.domains.get(domain)
        unit = f"{resampling.units} {resampling.unit}" if resampling else "–"
        lines.append(f"| {domain} | {unit} | " + " | ".join(cells) + " |")
    return lines


def margin_text(min_effect: float) -> str:
    """The margin as the report spells it, e.g. '±0.5%'."""
    return f"±{min_effect * 100:g}%"
