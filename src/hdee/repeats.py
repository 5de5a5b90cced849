"""The report's reading of a run with `run.repeats: N`: each configuration's test perplexity
as mean and standard deviation over repeats, and which wins hold in every repeat.

The rule across repeats: a domain's reading (`hdee.significance`: a configuration's *win*,
its paired-bootstrap interval against every other configuration lying beyond the equivalence
margin `evaluation.min_effect` in its favour, or a best group "tied best (equivalent)" /
"tied best (undecided)") holds across repeats when **every** repeat reads the same. Anything
else is undecided: a win in some repeats only, different winners or groups in different
repeats. Without intervals (`evaluation.bootstrap_resamples: 0`) the rule falls back to "the
lowest perplexity in every repeat", which the report labels as not a significance test.

Why this rule and not an interval over the repeats' mean difference: with the few repeats a
run affords (2 to 5), a t-interval over repeats has 1 to 4 degrees of freedom and is too wide
to say anything, while "the same reading in every repeat" uses each repeat's thousands of test
documents and asks the question repeats answer, whether the result survives another training
seed.

Pure functions over the per-repeat tables and `records.Uncertainty`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hdee.records import EvaluationResults, Uncertainty
from hdee.significance import Outcome, configuration_outcomes, margin_text

LOWEST_RULE = "lowest perplexity"


@dataclass(frozen=True)
class RepeatResults:
    """One repeat's evaluation: its index, training seed and results."""

    index: int
    training_seed: int
    results: EvaluationResults


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def across_repeats(
    tables: list[dict[str, dict[str, float]]],
) -> dict[str, dict[str, tuple[float, float]]]:
    """configuration -> domain -> (mean, std) of the per-repeat perplexities, for the domains
    every repeat scored."""
    names = list(tables[0])
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name in names:
        domains = [d for d in tables[0][name] if all(d in t.get(name, {}) for t in tables)]
        out[name] = {d: mean_std([t[name][d] for t in tables]) for d in domains}
    return out


def lowest(table: dict[str, dict[str, float]], domain: str) -> str | None:
    """The configuration with the strictly lowest perplexity on `domain` (None: a tie)."""
    scored = sorted((row[domain], name) for name, row in table.items() if domain in row)
    if not scored or (len(scored) > 1 and scored[0][0] == scored[1][0]):
        return None
    return scored[0][1]


def consistent_outcomes(
    tables: list[dict[str, dict[str, float]]],
    uncertainties: list[Uncertainty | None],
    method: str,
    domains: list[str],
    min_effect: float,
) -> tuple[dict[str, Outcome | None], bool]:
    """Domain -> the reading every repeat agrees on (None: the repeats disagree), and whether
    the rule was the intervals (every repeat has them) or only the lowest perplexity."""
    names = list(tables[0])
    with_intervals = all(u is not None for u in uncertainties)
    per_repeat: list[dict[str, Outcome]] = []
    for table, uncertainty in zip(tables, uncertainties, strict=True):
        if with_intervals:
            assert uncertainty is not None
            per_repeat.append(
                configuration_outcomes(uncertainty, method, names, domains, min_effect)
            )
        else:
            lowest_names = {d: lowest(table, d) for d in domains}
            per_repeat.append(
                {
                    d: Outcome((w,), "win") if w else Outcome(tuple(names), "undecided")
                    for d, w in lowest_names.items()
                }
            )
    agreed: dict[str, Outcome | None] = {}
    for domain in domains:
        found = {o[domain] for o in per_repeat}
        agreed[domain] = found.pop() if len(found) == 1 else None
    return agreed, with_intervals


def repeats_markdown(
    repeats: list[RepeatResults],
    tables: list[dict[str, dict[str, float]]],
    method_title: str,
    method: str,
    domains: list[str],
    baseline: str,
    missing: list[int],
    min_effect: float,
) -> list[str]:
    """The report's "Repeats" section (empty for a run of one repeat)."""
    if len(repeats) + len(missing) < 2:
        return []
    title = f"## Repeats ({len(repeats) + len(missing)} runs of the experiment)"
    if len(repeats) < 2:
        return [
            title,
            "",
            f"Only {len(repeats)} repeat(s) have results; repeat(s) {missing} have none yet "
            "(run `hdee run` again, or `hdee evaluate`).",
            "",
        ]
    stats = across_repeats(tables)
    uncertainties = [r.results.uncertainty for r in repeats]
    agreed, with_intervals = consistent_outcomes(tables, uncertainties, method, domains, min_effect)
    winners = {d: o.winner if o else None for d, o in agreed.items()}
    names = list(stats)
    kinds = {
        d: {r.results.domains[d].kind for r in repeats if d in r.results.domains} for d in domains
    }
    hetero = sum(w is not None and w != baseline for w in winners.values())
    tied = sum(o is not None and o.winner is None for o in agreed.values())
    disagree = sum(o is None for o in agreed.values())
    seeds = ", ".join(str(r.training_seed) for r in repeats)
    rule = (
        "the same reading in every repeat (a win: the paired-bootstrap interval against every "
        f"other configuration lies beyond the {margin_text(min_effect)} margin "
        "(evaluation.min_effect); else the best group, tied best as equivalent or undecided)"
        if with_intervals
        else f"the {LOWEST_RULE} in every repeat; some repeat has no confidence intervals "
        "(evaluation.bootstrap_resamples: 0), so this is not a significance test"
    )
    lines = [
        title,
        "",
        f"Test perplexity ({method_title}) of each configuration's final ensemble, mean ± "
        f"standard deviation (n - 1) over {len(repeats)} repeats with training seeds {seeds} "
        "(data order, and initialisation of the seeds) on the same prepared data. A domain's "
        f"result across repeats is {rule}; where the repeats read differently it is undecided.",
        "",
        f"**Across repeats a heterogeneous configuration wins {hetero} of {len(winners)} "
        f"domains, the baseline {baseline} {sum(w == baseline for w in winners.values())}; "
        f"{tied} tied best in every repeat, {disagree} undecided because the repeats "
        "disagree.**",
        "",
    ]
    if missing:
        lines += [f"Repeat(s) {missing} have no results yet and are left out.", ""]
    lines += [
        "| domain | kind | " + " | ".join(names) + " | result in every repeat |",
        "| --- | --- | " + " | ".join("---:" for _ in names) + " | --- |",
    ]
    for domain in domains:
        cells = []
        for name in names:
            if domain not in stats[name]:
                cells.append("–")
                continue
            mean, std = stats[name][domain]
            text = f"{mean:.2f} ± {std:.2f}"
            cells.append(f"**{text}**" if winners.get(domain) == name else text)
        kind = " / ".join(sorted(k.replace("_", "-") for k in kinds[domain])) or "–"
        outcome = agreed.get(domain)
        result = outcome.describe() if outcome else "undecided (the repeats disagree)"
        lines.append(f"| {domain} | {kind} | " + " | ".join(cells) + f" | {result} |")
    lines += [
        "",
        "A domain's kind differs between repeats when the repeats' seeds ranked its difficulty "
        "differently. The sections below are repeat 0's; each repeat's numbers are in its "
        "`evaluation/results.json` (repeat k >= 1 under `repeats/<k>/`).",
        "",
    ]
    return lines
