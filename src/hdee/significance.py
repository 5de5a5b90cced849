"""Wins that are not noise: the report's reading of the paired intervals in results.json.

A system (a configuration, or a method) is *significantly best* on a domain when its interval
against every other system lies entirely below zero (lower perplexity, the whole interval);
when no system is, the domain is a *tie*. Pure functions over `records.Uncertainty`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from hdee.records import PairedDifference, Uncertainty


def _beats(pairs: dict[tuple[str, str], PairedDifference], system: str, other: str) -> bool:
    """Whether `system` is significantly better than `other` (their pair in either order)."""
    if (other, system) in pairs:  # system is the candidate: better when the interval is < 0
        return pairs[(other, system)].high < 0
    if (system, other) in pairs:  # system is the reference: better when the interval is > 0
        return pairs[(system, other)].low > 0
    return False


def significant_winner(pairs: Iterable[PairedDifference], systems: list[str]) -> str | None:
    """The system significantly better than every other among `pairs` (one domain), or None."""
    by_pair = {(p.reference, p.candidate): p for p in pairs}
    for system in systems:
        if all(_beats(by_pair, system, other) for other in systems if other != system):
            return system
    return None


def configuration_winners(
    uncertainty: Uncertainty, method: str, names: list[str], domains: list[str]
) -> dict[str, str | None]:
    """Domain -> the significantly best configuration under `method` (None: a tie)."""
    return {
        domain: significant_winner(
            (p for p in uncertainty.configurations if p.domain == domain and p.method == method),
            names,
        )
        for domain in domains
    }


def method_winners(
    uncertainty: Uncertainty, configuration: str, methods: list[str], domains: list[str]
) -> dict[str, str | None]:
    """Domain -> the significantly best method within `configuration` (None: a tie)."""
    return {
        domain: significant_winner(
            (
                p
                for p in uncertainty.methods
                if p.domain == domain and p.configuration == configuration
            ),
            methods,
        )
        for domain in domains
    }


def tally(winners: dict[str, str | None], systems: list[str]) -> str:
    """'A best in X of Y domains (significant), B best in ...; Z ties'."""
    total = len(winners)
    ties = sum(winner is None for winner in winners.values())
    parts = [
        f"{system} best in {sum(w == system for w in winners.values())} of {total} domains "
        "(significant)"
        for system in systems
    ]
    return ", ".join(parts) + f"; {ties} tie{'s' if ties != 1 else ''}"


def relative_change(pair: PairedDifference) -> str:
    """The candidate's perplexity against the reference's as a percentage with its interval,
    e.g. '-1.2% [-2.0, -0.4]' (exp of the log-perplexity difference)."""

    def pct(value: float) -> float:
        return (math.exp(value) - 1) * 100

    return f"{pct(pair.delta):+.1f}% [{pct(pair.low):+.1f}, {pct(pair.high):+.1f}]"


def against_reference_table(
    uncertainty: Uncertainty, method: str, reference: str, domains: list[str]
) -> list[str]:
    """Markdown rows: each configuration's perplexity against `reference`, per domain, with
    its interval; a significant difference in bold."""
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
            text = relative_change(pair)
            cells.append(f"**{text}**" if pair.high < 0 or pair.low > 0 else text)
        resampling = uncertainty.domains.get(domain)
        unit = f"{resampling.units} {resampling.unit}" if resampling else "–"
        lines.append(f"| {domain} | {unit} | " + " | ".join(cells) + " |")
    return lines
