"""The report's reading of a run with `run.repeats: N`: each configuration's test perplexity
as mean and standard deviation over repeats, and which wins hold in every repeat.

The rule for a win across repeats: a configuration wins a domain when it is the
*significantly best* configuration there (`hdee.significance`: its paired-bootstrap interval
against every other configuration excludes zero in its favour) in **every** repeat. Anything
else is a tie: a win in some repeats only, or different winners in different repeats. Without
intervals (`evaluation.bootstrap_resamples: 0`) the rule falls back to "the lowest perplexity
in every repeat", which the report labels as not a significance test.

Why this rule and not an interval over the repeats' mean difference: with the few repeats a
run affords (2 to 5), a t-interval over repeats has 1 to 4 degrees of freedom and is too wide
to say anything, while "significant in every repeat" uses each repeat's thousands of test
documents and asks the question repeats answer, whether the win survives another training seed.

Pure functions over the per-repeat tables and `records.Uncertainty`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hdee.records import EvaluationResults, Uncertainty
from hdee.significance import configuration_winners

SIGNIFICANT_RULE = "significantly best (paired-bootstrap interval against every other "
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


def consistent_winners(
    tables: list[dict[str, dict[str, float]]],
    uncertainties: list[Uncertainty | None],
    method: str,
    domains: list[str],
) -> tuple[dict[str, str | None], bool]:
    """Domain -> the configuration that wins it in every repeat (None: a tie), and whether the
    rule was significance (every repeat has intervals) or only the lowest perplexity."""
    names = list(tables[0])
    significant = all(u is not None for u in uncertainties)
    per_repeat: list[dict[str, str | None]] = []
    for table, uncertainty in zip(tables, uncertainties, strict=True):
        if significant:
            assert uncertainty is not None
            per_repeat.append(configuration_winners(uncertainty, method, names, domains))
        else:
            per_repeat.append({d: lowest(table, d) for d in domains})
    winners: dict[str, str | None] = {}
    for domain in domains:
        found = {w.get(domain) for w in per_repeat}
        winners[domain] = found.pop() if len(found) == 1 else None
    return winners, significant


def repeats_markdown(
    repeats: list[RepeatResults],
    tables: list[dict[str, dict[str, float]]],
    method_title: str,
    method: str,
    domains: list[str],
    baseline: str,
    missing: list[int],
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
    winners, significant = consistent_winners(tables, uncertainties, method, domains)
    names = list(stats)
    kinds = {
        d: {r.results.domains[d].kind for r in repeats if d in r.results.domains} for d in domains
    }
    hetero = sum(w is not None and w != baseline for w in winners.values())
    ties = sum(w is None for w in winners.values())
    seeds = ", ".join(str(r.training_seed) for r in repeats)
    rule = (
        f"{SIGNIFICANT_RULE}configuration excludes zero) in every repeat"
        if significant
        else f"{LOWEST_RULE} in every repeat; some repeat has no confidence intervals "
        "(evaluation.bootstrap_resamples: 0), so this is not a significance test"
    )
    lines = [
        title,
        "",
        f"Test perplexity ({method_title}) of each configuration's final ensemble, mean ± "
        f"standard deviation (n - 1) over {len(repeats)} repeats with training seeds {seeds} "
        "(data order, and initialisation of the seeds) on the same prepared data. A domain's "
        f"winner across repeats is the configuration that is {rule}; otherwise the domain is a "
        "tie.",
        "",
        f"**Across repeats a heterogeneous configuration wins {hetero} of {len(winners)} "
        f"domains, the baseline {baseline} {sum(w == baseline for w in winners.values())}, "
        f"{ties} tie{'s' if ties != 1 else ''}.**",
        "",
    ]
    if missing:
        lines += [f"Repeat(s) {missing} have no results yet and are left out.", ""]
    lines += [
        "| domain | kind | " + " | ".join(names) + " | winner in every repeat |",
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
        lines.append(
            f"| {domain} | {kind} | " + " | ".join(cells) + f" | {winners.get(domain) or 'tie'} |"
        )
    lines += [
        "",
        "A domain's kind differs between repeats when the repeats' seeds ranked its difficulty "
        "differently. The sections below are repeat 0's; each repeat's numbers are in its "
        "`evaluation/results.json` (repeat k >= 1 under `repeats/<k>/`).",
        "",
    ]
    return lines
