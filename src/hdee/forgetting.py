"""Forgetting across BTM iterations, and where the posterior sends held-out domains.

For a lane with domains d_1..d_K trained in that order by experts e_1..e_K,

    forgetting(d_i) = ppl(e_K, d_i) - ppl(e_i, d_i)

from the full matrix ppl(e_k, d_i), i <= k. Those numbers exist when `hdee evaluate` scored
every iteration's ensemble (`evaluation.every_iteration`) with `single_experts`: every lane's
expert after iteration k is then scored on every domain. Pure functions over the records.
"""

from __future__ import annotations

from dataclasses import dataclass

from hdee.ensemble import first_posterior_method
from hdee.records import EvaluationResults, Plan


@dataclass(frozen=True)
class ForgettingRow:
    configuration: str
    lane: str
    domain: str
    iteration: int  # when the lane trained on `domain`
    after: float  # ppl(e_i, d_i): right after its own iteration
    final: float  # ppl(e_K, d_i): the lane's last expert

    @property
    def forgetting(self) -> float:
        return self.final - self.after


def lane_perplexity(
    results: EvaluationResults, configuration: str, iteration: int, lane: str, domain: str
) -> float | None:
    """ppl of the lane's expert after `iteration` on `domain`, or None when not evaluated."""
    entry = results.configurations[configuration].iterations.get(iteration)
    scores = entry.domains.get(domain) if entry else None
    singles = scores.single_experts if scores else None
    score = singles.get(lane) if singles else None
    return score.perplexity if score else None


def forgetting_matrix(
    plan: Plan, results: EvaluationResults, configuration: str, lane: str
) -> dict[str, dict[int, float]]:
    """domain d_i -> {k: ppl(e_k, d_i) for k >= i that were evaluated}, in schedule order."""
    matrix: dict[str, dict[int, float]] = {}
    for i, domain in enumerate(plan.schedule[lane], 1):
        row = {}
        for k in range(i, plan.iterations + 1):
            value = lane_perplexity(results, configuration, k, lane, domain)
            if value is not None:
                row[k] = value
        matrix[domain] = row
    return matrix


def forgetting_rows(plan: Plan, results: EvaluationResults) -> list[ForgettingRow]:
    """One row per configuration, lane and trained domain whose own-iteration and final
    perplexities were both evaluated (none without `every_iteration` and `single_experts`)."""
    rows = []
    for name, configuration in results.configurations.items():
        if plan.iterations < 2 or len(configuration.iterations) < plan.iterations:
            continue  # only the final ensemble was scored: nothing to compare with
        for lane in plan.lanes:
            for i, domain in enumerate(plan.schedule[lane], 1):
                after = lane_perplexity(results, name, i, lane, domain)
                final = lane_perplexity(results, name, plan.iterations, lane, domain)
                if after is not None and final is not None:
                    rows.append(ForgettingRow(name, lane, domain, i, after, final))
    return rows


def held_out_assignment(
    plan: Plan, results: EvaluationResults, method: str | None = None
) -> dict[str, dict[str, tuple[str, float]]]:
    """Held-out domain -> configuration -> (the lane whose expert the final ensemble's posterior
    weighted most on average, that mean weight), from `mean_posterior[method]` (default: the
    table's first posterior method the run scored)."""
    method = method or first_posterior_method(results.methods)
    assignment: dict[str, dict[str, tuple[str, float]]] = {}
    for domain in plan.held_out_domains:
        for name, configuration in results.configurations.items():
            scores = configuration.final.domains.get(domain)
            weights = scores.mean_posterior.get(method) if scores else None
            if weights:
                lane = max(weights, key=weights.__getitem__)
                assignment.setdefault(domain, {})[name] = (lane, weights[lane])
    return assignment


def forgetting_markdown(plan: Plan, results: EvaluationResults) -> list[str]:
    """The report's "Forgetting" and "Held-out domains: lane assignment" sections."""
    lines: list[str] = []
    rows = forgetting_rows(plan, results)
    if rows:
        lines += [
            "## Forgetting across iterations",
            "",
            "Test perplexity of each trained domain under its lane's expert right after the "
            f"iteration that trained it and after the last iteration ({plan.iterations}); "
            "forgetting = ppl(last expert) - ppl(own expert), positive when later domains "
            "made the lane worse at earlier ones.",
            "",
            "| configuration | lane | domain | iteration | ppl after own iteration | ppl at end "
            "| forgetting |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for row in rows:
            lines.append(
                f"| {row.configuration} | {row.lane} | {row.domain} | {row.iteration} | "
                f"{row.after:.2f} | {row.final:.2f} | {row.forgetting:+.2f} |"
            )
        lines.append("")
    elif plan.iterations > 1:
        lines += [
            "## Forgetting across iterations",
            "",
            "Not measured: set `evaluation.every_iteration: true` (with the `single_experts` "
            "method) to score every lane's experts after every iteration.",
            "",
        ]
    assignment = held_out_assignment(plan, results)
    if assignment:
        names = list(results.configurations)
        lines += [
            "## Held-out domains: lane assignment",
            "",
            "The lane whose expert the domain posterior (uniform prior) weighted most, on "
            "average over the test labels, in each configuration's final ensemble.",
            "",
            "| held-out domain | " + " | ".join(names) + " |",
            "| --- | " + " | ".join("---" for _ in names) + " |",
        ]
        for domain, chosen in assignment.items():
            cells = [f"{chosen[n][0]} ({chosen[n][1]:.2f})" if n in chosen else "–" for n in names]
            lines.append(f"| {domain} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
