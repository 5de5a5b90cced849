"""`hdee report`: the run's results as Markdown (in the manner of the paper's table), plus plots.

Reads what the stages wrote (plan.json, difficulty.json, evaluation/results.json, each job's
metrics.jsonl) and writes RUN/report/report.md with PNGs beside it. Pure reading and writing:
nothing here runs a model, so a report can be re-made at any time.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

from hdee.atomic import atomic_path, write_text
from hdee.config import ExperimentConfig
from hdee.data.splits import SPLIT_NAMES
from hdee.data.tokens import read_manifest
from hdee.ensemble import METHODS, any_cached_prior_method, first_posterior_method
from hdee.forgetting import forgetting_markdown, forgetting_matrix
from hdee.formatting import si
from hdee.layout import RunLayout
from hdee.metrics import read_metrics
from hdee.records import (
    ComputeResults,
    DifficultyRecord,
    EvaluationResults,
    Plan,
    RoutedScore,
    TasksResults,
)
from hdee.repeats import RepeatResults, repeats_markdown
from hdee.significance import (
    Outcome,
    against_reference_table,
    classify_relative,
    configuration_outcomes,
    margin_text,
    method_outcomes,
    tally,
)


# The method the headline table uses: the first of the table a run scored (the paper ensembles
# with a domain posterior, uniform prior: the table puts it first).
def headline_methods() -> list[str]:
    """Every method of the table (hdee.ensemble.METHODS), in its order: the first one a run
    scored heads the report."""
    return list(METHODS)


def method_title(name: str) -> str:
    return METHODS[name].label if name in METHODS else name


def _fmt(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.2f}"


# ----------------------------------------------------------------------------------------------
# Reading results (pure)


def final_perplexities(results: EvaluationResults, method: str) -> dict[str, dict[str, float]]:
    """configuration -> domain -> test perplexity of `method` for the final ensemble."""
    return {
        name: {
            domain: scores.methods[method].perplexity
            for domain, scores in configuration.final.domains.items()
            if method in scores.methods
        }
        for name, configuration in results.configurations.items()
    }


def best_per_domain(
    table: dict[str, dict[str, float]], baseline: str | None = None, tie: float = 1e-4
) -> dict[str, str]:
    """Domain -> the configuration with the lowest perplexity. Within a relative `tie` of the
    best, the baseline keeps the row (a shared expert gives near-identical numbers, which is
    no win for anyone); otherwise the first listed wins ties."""
    best: dict[str, str] = {}
    for d in {d for row in table.values() for d in row}:
        names = [name for name in table if d in table[name]]
        winner = min(names, key=lambda n: table[n][d])
        if baseline in names and table[baseline][d] <= table[winner][d] * (1 + tie):
            winner = baseline
        best[d] = winner
    return best


def heterogeneous_wins(table: dict[str, dict[str, float]], baseline: str) -> tuple[int, int]:
    """In how many domains a heterogeneous configuration (any but the baseline) is best."""
    best = best_per_domain(table, baseline)
    return sum(name != baseline for name in best.values()), len(best)


# ----------------------------------------------------------------------------------------------
# Markdown


def _perplexity_table(
    table: dict[str, dict[str, float]],
    domains: list[str],
    classes: dict[str, str],
    baseline: str,
    outcomes: dict[str, Outcome] | None = None,
) -> list[str]:
    """With `outcomes` (domain -> the best group, hdee.significance) only a win is bold and
    the result column says win, or tied best (equivalent / undecided) and who; without, the
    lowest number is bold."""
    names = list(table)
    extra = outcomes is not None
    best: dict[str, str | None] = (
        {d: o.winner for d, o in outcomes.items()}
        if outcomes is not None
        else dict(best_per_domain(table, baseline))
    )
    lines = [
        "| domain | class | " + " | ".join(names) + (" | result |" if extra else " |"),
        "| --- | --- | " + " | ".join("---:" for _ in names) + (" | --- |" if extra else " |"),
    ]
    for domain in domains:
        cells = []
        for name in names:
            value = table[name].get(domain)
            text = _fmt(value)
            cells.append(f"**{text}**" if best.get(domain) == name else text)
        if outcomes is not None:
            outcome = outcomes.get(domain)
            cells.append(outcome.describe() if outcome else "–")
        lines.append(f"| {domain} | {classes.get(domain, '')} | " + " | ".join(cells) + " |")
    return lines


def _budget_lines(plan: Plan) -> list[str]:
    lanes = plan.lanes
    lines = [
        "| configuration | "
        + " | ".join(f"{lane} size / steps" for lane in lanes)
        + " | &#124;FFN&#124; x steps | training FLOPs | vs baseline (proxy / FLOPs) |",
        "| --- | " + " | ".join("---" for _ in lanes) + " | ---: | ---: | ---: |",
    ]
    for name, c in plan.configurations.items():
        label = f"{name} (baseline)" if name == plan.baseline else name
        lines.append(
            f"| {label} | "
            + " | ".join(f"{c.sizes[lane]} / {c.steps[lane]}" for lane in lanes)
            + f" | {si(c.budget.proxy)} | {si(c.budget.flops)} | "
            f"{plan.relative_budget_gap(name, 'proxy'):+.2%} / "
            f"{plan.relative_budget_gap(name, 'flops'):+.2%} |"
        )
    lines += [
        "",
        f"Seeds ({', '.join(sorted(plan.seeds))}, one per size, shared by every "
        f"configuration) cost a further {si(plan.seed_budget.proxy)} in |FFN| x steps and "
        f"{si(plan.seed_budget.flops)} training FLOPs, not included above.",
    ]
    return lines


def _schedule_lines(plan: Plan) -> list[str]:
    iterations = plan.iterations
    lines = [
        "| lane | " + " | ".join(f"iteration {k + 1}" for k in range(iterations)) + " |",
        "| --- | " + " | ".join("---" for _ in range(iterations)) + " |",
    ]
    for lane in plan.lanes:
        lines.append(f"| {lane} | " + " | ".join(plan.schedule[lane]) + " |")
    return lines


def _difficulty_lines(record: DifficultyRecord) -> list[str]:
    lines = [
        f"Seed validation perplexity ({', '.join(record.seed_sizes)}), method "
        f"`{record.method}`; cut points " + ", ".join(_fmt(c) for c in record.cut_points) + ".",
        "",
        "| rank | domain | seed perplexity | class |",
        "| ---: | --- | ---: | --- |",
    ]
    for rank, domain in enumerate(record.ranking, 1):
        cls = record.classes.get(domain)
        if cls is None:
            cls = f"held-out (would be {record.held_out_classes.get(domain, '?')})"
        lines.append(f"| {rank} | {domain} | {_fmt(record.perplexity[domain])} | {cls} |")
    return lines


def _headline(
    plan: Plan,
    results: EvaluationResults,
    config: ExperimentConfig,
    methods: list[str],
    table: dict[str, dict[str, float]],
) -> tuple[Any, list[str]]:
    """The per-domain outcomes of the configurations (None without intervals) and the
    report's headline lines."""
    headline, baseline = methods[0], plan.baseline
    wins, total = heterogeneous_wins(table, baseline)
    trained_wins, trained_total = heterogeneous_wins(
        {
            n: {d: v for d, v in row.items() if d in plan.trained_domains}
            for n, row in table.items()
        },
        baseline,
    )
    min_effect = config.evaluation.min_effect
    outcomes = (
        configuration_outcomes(
            results.uncertainty,
            headline,
            list(table),
            plan.trained_domains + plan.held_out_domains,
            min_effect,
        )
        if results.uncertainty
        else None
    )
    if outcomes is not None:
        headline_lines = significance_headline(
            plan, results, headline, outcomes, methods, min_effect
        )
    else:
        headline_lines = [
            f"**A heterogeneous configuration has the lowest perplexity in {wins} of {total} "
            f"domains** ({trained_wins} of {trained_total} trained, {wins - trained_wins} of "
            f"{total - trained_total} held out; baseline {baseline}, method: "
            f"{method_title(headline)}). Lowest perplexity per row in bold; within 0.01% of the "
            "baseline counts as the baseline's. No confidence intervals were computed "
            "(evaluation.bootstrap_resamples is 0): differences this small may be noise.",
        ]

    return outcomes, headline_lines


def render_markdown(
    plan: Plan,
    results: EvaluationResults,
    difficulty: DifficultyRecord | None,
    config: ExperimentConfig,
    plots: dict[str, str],
    repeats_lines: list[str] | None = None,
) -> str:
    classes = domain_classes(plan, difficulty)
    baseline = plan.baseline
    methods = [m for m in headline_methods() if any(final_perplexities(results, m).values())]
    headline = methods[0]
    table = final_perplexities(results, headline)
    outcomes, headline_lines = _headline(plan, results, config, methods, table)
    min_effect = config.evaluation.min_effect

    out = [
        "# HDEE report",
        "",
        f"Run `{config.run_dir}`: {len(plan.trained_domains)} trained and "
        f"{len(plan.held_out_domains)} held-out domains, {plan.iterations} "
        f"BTM iteration(s), model preset `{config.model.preset}`, sequence length "
        f"{config.data.seq_len}. Test-split perplexity of each configuration's final ensemble; "
        f"the domain posterior is **{results.posterior}** "
        + (
            "(the whole prefix, HDEE)."
            if results.posterior == "prefix"
            else "(previous token only, as in BTM / DEMix code)."
        )
        + cached_prior_rule(results, config),
        "",
        *headline_lines,
        "",
        *(repeats_lines or []),
        "## Trained domains",
        "",
        *_perplexity_table(table, plan.trained_domains, classes, baseline, outcomes),
        "",
        "## Held-out domains",
        "",
        *_perplexity_table(table, plan.held_out_domains, classes, baseline, outcomes),
        "",
        *uncertainty_section(plan, results, headline, min_effect),
        *_methods_lines(results, methods, list(table)),
        *opt_out_lines(results, classes, min_effect),
        *forgetting_markdown(plan, results),
    ]
    out += [
        "",
        "The geometric mean summarises; per domain the methods are compared in the section on "
        "confidence intervals. Per-domain numbers of every method and every single expert: "
        "`evaluation/results.csv`.",
        "",
        "## Compute budgets",
        "",
        *_budget_lines(plan),
        "",
        "## Lanes",
        "",
        *_schedule_lines(plan),
        "",
    ]
    if difficulty:
        out += ["## Domain difficulty", "", *_difficulty_lines(difficulty), ""]
    if plots:
        out += ["## Plots", ""]
        for title, name in plots.items():
            out += [f"### {title}", "", f"![{title}]({name})", ""]
    out += [
        "---",
        "Made by `hdee report`. Tiny demo models are not the paper's scale: read the numbers as a "
        "check that the method runs end to end, not as a reproduction.",
    ]
    return "\n".join(out) + "\n"


CACHED_PRIOR_RULES = {
    "window": "each validation window adds its whole-window posterior to a moving average "
    "that starts from uniform (the BTM / DEMix paper)",
    "last_token": "each validation window adds its one-token posterior at its last position "
    "to a moving average that starts from the first window's (the DEMix code)",
}


def cached_prior_rule(results: EvaluationResults, config: ExperimentConfig) -> str:
    """' The cached prior follows the rule `window`: ...' when a cached prior ran (the method,
    or the ensemble keys' prior), else ''."""
    ran = any_cached_prior_method(results.methods)
    ran = ran or config.evaluation.prior_choice.kind == "cached"
    if not ran:
        return ""
    windows = sorted(
        {d.validation_windows for d in results.domains.values() if d.validation_windows}
    )
    count = (
        (f"{windows[0]}" if len(windows) == 1 else f"{windows[0]} to {windows[-1]}")
        if windows
        else "the"
    )
    return (
        f" The cached prior follows the rule `{results.cached_prior_update}` "
        "(evaluation.cached_prior_update): "
        f"{CACHED_PRIOR_RULES.get(results.cached_prior_update, 'see docs/evaluation.md')}, "
        f"decay {results.cached_prior_decay:g}, over {count} validation windows of each domain."
    )


def domain_classes(plan: Plan, difficulty: DifficultyRecord | None) -> dict[str, str]:
    """Each domain's class as the tables show it (held-out domains: the class they fall in)."""
    classes = dict(plan.classes or {})
    if difficulty:
        classes.update({d: f"held-out ({c})" for d, c in difficulty.held_out_classes.items()})
    for d in plan.held_out_domains:
        # A trainable domain the schedule did not reach is evaluated like a held-out one.
        classes[d] = (
            f"not scheduled ({classes[d]})"
            if d in (plan.classes or {})
            else classes.get(d, "held-out")
        )
    return classes


def _methods_lines(results: EvaluationResults, methods: list[str], names: list[str]) -> list[str]:
    """Every method of the table a run scored, geometric mean of perplexity over domains."""
    out = [
        "## Every method (geometric mean of perplexity over domains)",
        "",
        "| method | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---:" for _ in names) + " |",
    ]
    for method in methods:
        per = final_perplexities(results, method)
        cells = []
        for name in names:
            values = list(per[name].values())
            mean = math.exp(sum(math.log(v) for v in values) / len(values)) if values else None
            cells.append(_fmt(mean))
        out.append(f"| {method_title(method)} | " + " | ".join(cells) + " |")
    return [*out, ""]


def opt_out_lines(
    results: EvaluationResults, classes: dict[str, str], min_effect: float
) -> list[str]:
    """The opt-out study (evaluation.opt_out): every domain's perplexity with and without the
    withdrawn members, the paired interval of the change and its verdict against the margin."""
    if not results.opt_out:
        return []
    level = f"{results.uncertainty.level:.0%}" if results.uncertainty else "95%"
    out = [
        "## Opt-out: withdrawing experts at inference",
        "",
        "Each entry of `evaluation.opt_out` withdrawn from every configuration's final ensemble "
        "(with every member trained on it or descended from one that was), scored with the dense "
        f"posterior ({results.posterior}); change in perplexity with its {level} paired-bootstrap "
        "interval, and the verdict of the ensemble without them against the ensemble with "
        f"them at the {margin_text(min_effect)} margin: loss (worse without), win (better "
        "without), equivalent or undecided. Bold: a win or a loss.",
        "",
    ]
    for study in results.opt_out:
        withdrawn = ", ".join(study.excluded) or "nothing"
        out += [
            f"### {study.withdrawn} withdrawn from {study.configuration} (members: {withdrawn})",
            "",
            "| domain | class | with | without | change | without vs with |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for domain, entry in study.domains.items():
            change = (
                f"{math.expm1(entry.delta):+.1%} [{math.expm1(entry.low):+.1%}, "
                f"{math.expm1(entry.high):+.1%}]"
            )
            verdict = classify_relative(math.expm1(entry.low), math.expm1(entry.high), min_effect)
            if verdict in ("win", "loss"):
                change, verdict = f"**{change}**", f"**{verdict}**"
            name = f"**{domain}**" if domain == study.withdrawn else domain
            out.append(
                f"| {name} | {classes.get(domain, '')} | {entry.with_members:.2f} | "
                f"{entry.without_members:.2f} | {change} | {verdict} |"
            )
        out.append("")
    return out


# ----------------------------------------------------------------------------------------------
# Confidence intervals (hdee.significance reads results.json's `uncertainty`)


def significance_headline(
    plan: Plan,
    results: EvaluationResults,
    method: str,
    outcomes: dict[str, Outcome],
    methods: list[str],
    min_effect: float,
) -> list[str]:
    """The headline: wins, and the domains tied best (equivalent / undecided), for
    configurations and for methods."""
    assert results.uncertainty is not None
    baseline = plan.baseline
    names = list(results.configurations)
    winners = {d: o.winner for d, o in outcomes.items()}
    total = len(outcomes)
    hetero = sum(w is not None and w != baseline for w in winners.values())
    equivalent = sum(o.verdict == "equivalent" for o in outcomes.values())
    undecided = sum(o.verdict == "undecided" for o in outcomes.values())
    trained = [d for d in plan.trained_domains if d in winners]
    hetero_trained = sum(winners[d] not in (None, baseline) for d in trained)
    units = {r.unit for r in results.uncertainty.domains.values()}
    margin = margin_text(min_effect)
    lines = [
        f"**A heterogeneous configuration wins {hetero} of {total} domains, the baseline "
        f"{baseline} wins {sum(w == baseline for w in winners.values())}; {equivalent} "
        f"tied best (equivalent), {undecided} tied best (undecided)** ({hetero_trained} of "
        f"{len(trained)} trained domains won by a heterogeneous configuration; method: "
        f"{method_title(method)}; margin {margin}).",
        "",
        f"Configurations ({method_title(method)}): {tally(outcomes, names)}.",
        "",
    ]
    domains = plan.trained_domains + plan.held_out_domains
    for name in names:
        by_method = method_outcomes(results.uncertainty, name, methods, domains, min_effect)
        lines.append(f"Methods within {name}: " + tally(by_method, methods) + ".")
        lines.append("")
    lines.append(
        f"Each comparison is the {results.uncertainty.level:.0%} paired-bootstrap interval "
        f"({results.uncertainty.resamples} resamples of the test "
        f"{' / '.join(sorted(units))}, seed {results.uncertainty.seed}) of the relative "
        f"perplexity difference, read against the equivalence margin {margin} "
        "(evaluation.min_effect): a win or a loss only when the whole interval lies beyond the "
        "margin on one side, equivalent when it lies within it, otherwise undecided. On each "
        "domain the best group is the leader and every system it does not beat: a group of one "
        "is a win (bold); a larger one is tied best, equivalent when every member is "
        "equivalent to the leader, else undecided."
    )
    return lines


def uncertainty_section(
    plan: Plan, results: EvaluationResults, method: str, min_effect: float
) -> list[str]:
    if results.uncertainty is None:
        return []
    domains = plan.trained_domains + plan.held_out_domains
    rows = against_reference_table(results.uncertainty, method, plan.baseline, domains, min_effect)
    if not rows:
        return []
    units = {r.unit for r in results.uncertainty.domains.values()}
    note = (
        "Whole documents were resampled (windows of one document move together)."
        if units == {"documents"}
        else "Where the unit is windows, the window-to-document map was not known (or a domain's"
        " test split is one document): neighbouring windows are correlated and those "
        "intervals are too narrow."
    )
    return [
        f"## Confidence intervals ({method_title(method)})",
        "",
        f"Perplexity of each configuration relative to the baseline {plan.baseline}, with its "
        f"{results.uncertainty.level:.0%} paired-bootstrap interval and its verdict against "
        f"the {margin_text(min_effect)} margin: win (better), loss (worse), equivalent or "
        f"undecided; a win or a loss in bold. {note} Every pair of configurations and of "
        "methods: `evaluation/results.json` (`uncertainty`).",
        "",
        *rows,
        "",
    ]


# ----------------------------------------------------------------------------------------------
# Plots


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        # "tight": legends placed beside or below the axes are kept, not cut off.
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(
    table: dict[str, dict[str, float]], domains: list[str], path: Path, title: str
) -> None:
    plt = _pyplot()
    names = list(table)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(domains) + 2), 4))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [table[name].get(d, float("nan")) for d in domains], width, label=name)
    ax.set_xticks(range(len(domains)))
    ax.set_xticklabels(domains, rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    _log_ticks(ax, "y")
    ax.set_ylabel("test perplexity (log scale)")
    ax.set_title(title)
    # Beside the axes: over the bars it would hide data.
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    _save(fig, path)


def plot_posteriors(results: EvaluationResults, domains: list[str], path: Path) -> bool:
    """Mean posterior weight of each lane's expert per domain, one panel per configuration."""
    panels = []
    for name, configuration in results.configurations.items():
        final = configuration.final
        lanes = list(final.experts)
        rows = []
        for d in domains:
            scores = final.domains.get(d)
            method = first_posterior_method(scores.mean_posterior) if scores else None
            weights = scores.mean_posterior[method] if scores and method else None
            if weights is None:
                return False
            rows.append([weights[lane] for lane in lanes])
        panels.append((name, lanes, rows))
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels) + 1, 0.32 * len(domains) + 1.8), squeeze=False
    )
    for ax, (name, lanes, rows) in zip(axes[0], panels, strict=True):
        image = ax.imshow(rows, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(lanes)))
        ax.set_xticklabels(lanes, rotation=30, fontsize=8)
        ax.set_yticks(range(len(domains)))
        ax.set_yticklabels(domains if ax is axes[0][0] else [], fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean P(expert | prefix)")
    _save(fig, path)
    return True


def plot_training_curves(plan: Plan, layout: RunLayout, path: Path) -> bool:
    """Training loss (lines) and validation loss (dots) of every job, seeds then lanes."""
    groups: dict[str, list[str]] = {"seeds": list(plan.seeds.values())}
    for job in plan.expert_jobs():
        groups.setdefault(f"{job.lane} lane", []).append(job.job_id)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 4.4), squeeze=False)
    drew = False
    for ax, (title, job_ids) in zip(axes[0], groups.items(), strict=True):
        colours: dict[str, str] = {}
        for job_id in job_ids:
            job = plan.jobs[job_id]
            # Experts continue their parent's curve: shift each by its ancestors' steps.
            offset, parent = 0, job.init_from
            while parent and plan.jobs[parent].kind == "expert":
                offset += plan.jobs[parent].steps
                parent = plan.jobs[parent].init_from
            rows = read_metrics(layout.job(job_id).metrics)
            train = [(r["step"] + offset, r["loss"]) for r in rows if "loss" in r]
            val = [
                (r["step"] + offset, v)
                for r in rows
                for k, v in r.items()
                if k.startswith("val/") and k.endswith("/loss")
            ]
            if not train:
                continue
            drew = True
            label = job.size if job.kind == "seed" else f"{job.size}/{job.steps}"
            # One colour per size/steps, so a configuration's expert reads as one curve
            # continuing through the iterations.
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            # Seeds differ in line style too, so sizes stay apart where colours are close.
            style = ("-", "--", ":", "-.")[len(colours) % 4] if job.kind == "seed" else "-"
            ax.plot(
                *zip(*train, strict=True), linewidth=1, label=label, color=colour, linestyle=style
            )
            if val:
                ax.scatter(
                    *zip(*val, strict=True),
                    s=22,
                    marker="D",
                    color=colour,
                    edgecolors="black",
                    linewidths=0.5,
                    zorder=3,
                    label="validation (same colour)",
                )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step (experts continue their parent)", fontsize=8)
        ax.set_ylabel("loss (log scale)", fontsize=8)
        if drew:
            ax.set_yscale("log")
            _log_ticks(ax, "y")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=False))
        # Below the axes: inside them it covers the curves' start, where loss is highest.
        ax.legend(
            unique.values(),
            unique.keys(),
            fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.22),
            ncol=2,
        )
    fig.tight_layout()
    if drew:
        _save(fig, path)
    else:
        plt.close(fig)
    return drew


def plot_forgetting(plan: Plan, results: EvaluationResults, path: Path) -> bool:
    """ppl(e_k, d_i) against iteration k: one panel per configuration, one colour per lane,
    one marker per domain of that lane (a rising line is forgetting)."""
    panels = []
    for name in results.configurations:
        curves = [
            (lane, domain, row)
            for lane in plan.lanes
            for domain, row in forgetting_matrix(plan, results, name, lane).items()
            if len(row) > 1
        ]
        if curves:
            panels.append((name, curves))
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels) + 1.5, 3.6), squeeze=False, sharey=True
    )
    markers = "osD^v<>"
    for ax, (name, curves) in zip(axes[0], panels, strict=True):
        for lane_index, lane in enumerate(plan.lanes):
            for domain_index, (curve_lane, domain, row) in enumerate(
                c for c in curves if c[0] == lane
            ):
                ks = sorted(row)
                ax.plot(
                    ks,
                    [row[k] for k in ks],
                    color=f"C{lane_index}",
                    marker=markers[domain_index % len(markers)],
                    linewidth=1.2,
                    label=f"{curve_lane}: {domain}",
                )
        ax.set_yscale("log")
        ax.set_xticks(range(1, plan.iterations + 1))
        ax.set_xlabel("after iteration", fontsize=8)
        ax.set_title(name, fontsize=9)
    # After every panel: set_yscale on a shared axis resets the tick locators.
    _log_ticks(axes[0][0], "y")
    axes[0][0].set_ylabel("test perplexity of the lane's expert (log)", fontsize=8)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    _save(fig, path)
    return True


def _log_ticks(ax: Any, axis: str, count: int = 6) -> None:
    """About `count` labelled ticks, evenly spaced on a log axis and rounded to two significant
    digits (matplotlib labels only powers of ten by default, so a range inside one decade shows
    no number at all). Call it after the data are drawn: it reads the axis limits."""
    import numpy as np
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if not (0 < low < high):
        return
    ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(low, high, count)})
    ticks = [t for t in ticks if low <= t <= high] or ticks
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
    target.set_minor_locator(NullLocator())


# ----------------------------------------------------------------------------------------------
# Quality vs compute (the `compute` section of results.json: hdee.routing, docs/evaluation.md)


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def compute_points(compute: ComputeResults) -> dict[str, list[dict[str, Any]]]:
    """configuration -> its systems, cheapest first: {"system", "experts", "perplexity" (the
    geometric mean over domains), "flops_per_token" (the mean over domains), "gain_retained"}.
    gain_retained is (ppl_best_single - ppl) / (ppl_best_single - ppl_full): the share of the
    full ensemble's gain over the best single expert a system keeps (None when there is no
    gain to keep)."""
    points: dict[str, list[dict[str, Any]]] = {}
    for name, configuration in compute.configurations.items():
        domains = list(configuration.domains.values())
        if not domains:
            continue
        systems: dict[str, list[RoutedScore]] = {"best single": [], "full": []}
        for entry in domains:
            systems["best single"].append(entry.best_single)
            systems["full"].append(entry.full)
            if entry.latest is not None:
                systems.setdefault("latest ensemble", []).append(entry.latest)
            for routed in entry.routed:
                label = (
                    f"budget {si(routed.flop_budget)}"
                    if routed.flop_budget is not None
                    else f"top-{routed.experts}"
                )
                systems.setdefault(label, []).append(routed)
        rows = []
        for label, scores in systems.items():
            rows.append(
                {
                    "system": label,
                    "experts": scores[0].experts,
                    "perplexity": _geometric_mean([x.perplexity for x in scores]),
                    "flops_per_token": sum(x.flops_per_token for x in scores) / len(scores),
                }
            )
        single = next(r for r in rows if r["system"] == "best single")["perplexity"]
        full = next(r for r in rows if r["system"] == "full")["perplexity"]
        for row in rows:
            gain = single - full
            row["gain_retained"] = (single - row["perplexity"]) / gain if gain > 0 else None
        points[name] = sorted(rows, key=lambda r: r["flops_per_token"])
    return points


def _compute_lines(compute: ComputeResults) -> list[str]:
    routing = {
        "none": "no routing (dense only)",
        "prefix": f"prefix routing: every member reads the first {compute.route_tokens} tokens "
        "of a window, then only the top k continue",
        "prior": "prior routing: the top k of the domain's cached prior, no routing prefix",
        "budget": f"budget routing after {compute.route_tokens} tokens",
    }[compute.routing]
    lines = [
        f"Members: **{compute.members}** ("
        + (
            "the latest expert of every lane"
            if compute.members == "latest"
            else "every expert of every lane and iteration, BTM's growing forest"
        )
        + f"); {routing}; {compute.prior} prior. Perplexity is the geometric mean over domains, "
        "FLOPs the mean forward FLOPs per scored token actually spent (routing prefix "
        "included); the best single expert is chosen per domain. Routed perplexities are "
        "computed exactly from the cached log-probs; the FLOPs count what a routed run executes.",
        "",
        "| configuration | system | perplexity | FLOPs/token | vs full | gain kept |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in compute_points(compute).items():
        full = next(r for r in rows if r["system"] == "full")["flops_per_token"]
        for row in rows:
            kept = row["gain_retained"]
            lines.append(
                f"| {name} | {row['system']} | {_fmt(row['perplexity'])} | "
                f"{si(row['flops_per_token'])} | {row['flops_per_token'] / full:.2f}x | "
                + ("–" if kept is None else f"{kept:.0%}")
                + " |"
            )
    return lines


def _forest_lines(compute: ComputeResults) -> list[str]:
    """members: all: per domain, the latest-per-lane ensemble against the whole forest, which
    serves again the domains a lane's later experts forgot."""
    lines = [
        "| configuration | domain | latest ensemble | forest | change |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, configuration in compute.configurations.items():
        for domain, entry in configuration.domains.items():
            if entry.latest is None:
                continue
            latest, forest = entry.latest.perplexity, entry.full.perplexity
            lines.append(
                f"| {name} | {domain} | {_fmt(latest)} | {_fmt(forest)} | "
                f"{forest / latest - 1:+.1%} |"
            )
    return lines


def _with_compute_section(markdown: str, results: EvaluationResults) -> str:
    """The report with a "Quality vs compute" section before its footer (unchanged when the
    results have no compute section)."""
    compute = results.compute
    if compute is None or not compute.configurations:
        return markdown
    section = ["## Quality vs compute", "", *_compute_lines(compute), ""]
    if compute.members == "all":
        section += [
            "### The forest serves forgotten domains again",
            "",
            "Test perplexity of the final ensemble (latest expert of every lane) against every "
            "expert of every iteration, both dense.",
            "",
            *_forest_lines(compute),
            "",
        ]
    text = "\n".join(section) + "\n"
    head, footer_mark, footer = markdown.rpartition("---\nMade by")
    return head + text + footer_mark + footer if footer_mark else markdown + "\n" + text


def plot_pareto(compute: ComputeResults, path: Path) -> bool:
    """Perplexity against forward FLOPs per token: one curve per configuration through its
    systems (best single, routed k = 1.., full), the best single expert marked."""
    points = compute_points(compute)
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, rows) in enumerate(points.items()):
        colour = f"C{i % 10}"
        curve = [r for r in rows if r["system"] not in ("best single", "latest ensemble")]
        ax.plot(
            [r["flops_per_token"] for r in curve],
            [r["perplexity"] for r in curve],
            marker="o",
            color=colour,
            label=name,
        )
        for r in curve:
            ax.annotate(r["system"], (r["flops_per_token"], r["perplexity"]), fontsize=6)
        single = next(r for r in rows if r["system"] == "best single")
        ax.scatter(
            [single["flops_per_token"]], [single["perplexity"]], marker="*", s=90, color=colour
        )
    ax.set_xscale("log")
    ax.set_xlabel("forward FLOPs per scored token (log scale)")
    ax.set_ylabel("test perplexity (geometric mean over domains)")
    ax.set_title("Quality vs compute (star: best single expert per domain)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return True


# ----------------------------------------------------------------------------------------------
# The report


def tasks_markdown(results: TasksResults) -> str:
    """Markdown: one row per task and metric, one column per ensemble, then the best expert."""
    ensembles = [n for n, s in results.systems.items() if s.kind == "ensemble"]
    lines = [
        "| task | metric | " + " | ".join(ensembles) + " | best single expert |",
        "| --- | --- | " + " | ".join("---:" for _ in ensembles) + " | ---: |",
    ]
    for task in results.tasks:
        keys = sorted({k for n in ensembles for k in results.systems[n].metrics.get(task, {})})
        for key in keys:
            cells = [
                f"{results.systems[n].metrics.get(task, {}).get(key, float('nan')):.4f}"
                for n in ensembles
            ]
            best = results.best_single.get(task, {}).get(key)
            best_cell = f"{best.value:.4f} ({best.system})" if best else "–"
            lines.append(f"| {task} | {key} | " + " | ".join(cells) + f" | {best_cell} |")
    return "\n".join(lines)


def _with_tasks_section(markdown: str, layout: RunLayout) -> str:
    """The report with a "Downstream tasks" section (from RUN/tasks/results.json, written by
    `hdee tasks`) before its footer; unchanged when there are no task results."""
    if not layout.tasks_results.is_file():
        return markdown
    results = TasksResults.read(layout.tasks_results)
    shots = "zero-shot" if not results.num_fewshot else f"{results.num_fewshot}-shot"
    section = (
        "## Downstream tasks\n\n"
        f"lm-evaluation-harness {results.harness_version}, {shots}"
        + (f", at most {results.limit} documents per task" if results.limit else "")
        + f"; each configuration's final ensemble ({results.prior} prior, {results.posterior} "
        "posterior) against the best of its single experts, per task and metric. "
        "Every system's scores: `tasks/results.json`.\n\n" + tasks_markdown(results) + "\n\n"
    )
    head, footer_mark, footer = markdown.rpartition("---\nMade by")
    return head + section + footer_mark + footer if footer_mark else markdown + "\n" + section


def _with_discovery_section(
    markdown: str, layout: RunLayout, difficulty: DifficultyRecord | None
) -> str:
    """The "Discovered domains" section (data.discover): the clusters, their sizes, top terms,
    difficulty class and agreement with known labels, from discovery/discovery.json."""
    from hdee.records import DiscoveryRecord

    if not layout.discovery_record.is_file():
        return markdown
    record = DiscoveryRecord.read(layout.discovery_record)
    classes = dict(difficulty.classes) if difficulty else {}
    if difficulty:
        classes.update({d: f"held-out ({c})" for d, c in difficulty.held_out_classes.items()})
    what = (
        f"tf-idf, TruncatedSVD to {record.dimensions} dimensions, L2 norm"
        if record.features == "tfidf"
        else f"mean last hidden state of seed `{record.seed_job}`, centred, L2 norm"
    )
    low, high = record.sample_band
    lines = [
        "## Discovered domains",
        "",
        f"The run's domains are {len(record.clusters)} clusters of corpus `{record.corpus}` "
        f"({record.documents:,} documents): features {what}; balanced k-means fitted on "
        f"{record.sample_documents:,} of its {record.training_documents:,} training documents, "
        f"each cluster holding {low:,} to {high:,} of them (balance {record.balance:g}); every "
        "document then assigned to its nearest centroid after the balanced fit's offsets, at "
        f"most {record.corpus_cap:,} per cluster ({record.capped_documents:,} moved by that "
        "cap). A cluster's splits are the corpus's. Details: `discovery/discovery.json`.",
        "",
    ]
    labelled = any(c.labels for c in record.clusters.values())
    lines.append(
        "| cluster | class | documents (train / validation / test) | tokens | "
        + ("majority label | " if labelled else "")
        + "top terms |"
    )
    lines.append("| --- | --- | ---: | ---: | " + ("--- | " if labelled else "") + "--- |")
    for name, cluster in record.clusters.items():
        docs = " / ".join(
            f"{cluster.documents.get(s, 0):,}" for s in ("train", "validation", "test")
        )
        cells = [name, classes.get(name, "–"), docs, si(sum(cluster.tokens.values()))]
        if labelled:
            label, count = max((cluster.labels or {"–": 0}).items(), key=lambda item: item[1])
            share = count / max(1, sum((cluster.labels or {}).values()))
            cells.append(f"{label} ({share:.0%})")
        cells.append(", ".join(cluster.top_terms[:8]))
        lines.append("| " + " | ".join(cells) + " |")
    if record.agreement:
        a = record.agreement
        lines += [
            "",
            f"Against the {a.labels} known labels ({a.source} names): purity {a.purity:.3f}, "
            f"adjusted Rand index {a.adjusted_rand_index:.3f}, NMI "
            f"{a.normalized_mutual_info:.3f}.",
        ]
    section = "\n".join(lines) + "\n\n"
    head, footer_mark, footer = markdown.rpartition("---\nMade by")
    return head + section + footer_mark + footer if footer_mark else markdown + "\n" + section


def data_fingerprint(split_hashes: list[str]) -> str:
    """One hex sha256 for several text hashes (a corpus's splits, or every corpus's)."""
    return hashlib.sha256("\n".join(split_hashes).encode()).hexdigest()


def data_lines(general: str, plan: Plan, layout: RunLayout) -> list[str]:
    """The "Data" section: each corpus's documents and tokens per split and the sha256 of its
    text (`text_sha256` in the token manifests that `hdee prepare` writes), so that a reader can
    tell a different corpus from a different result; [] when nothing is prepared."""
    roles = {general: "general", **dict.fromkeys(plan.trained_domains, "trained")}
    roles |= dict.fromkeys(plan.held_out_domains, "held-out")
    rows, hashes = [], []
    for corpus, role in roles.items():
        try:
            manifests = [read_manifest(layout.tokens(corpus, split)) for split in SPLIT_NAMES]
        except (OSError, ValueError):
            return []
        split_hashes = [str(m.get("text_sha256", "")) for m in manifests]
        text = data_fingerprint(split_hashes) if all(split_hashes) else ""
        hashes.append(text)
        documents = " / ".join(f"{int(m['num_documents']):,}" for m in manifests)
        tokens = si(sum(int(m["num_tokens"]) for m in manifests))
        rows.append(f"| {corpus} | {role} | {documents} | {tokens} | `{text[:16] or '–'}` |")
    complete = all(hashes)
    return [
        "## Data",
        "",
        "Each corpus's text as `hdee prepare` read it: the sha256 of every document's UTF-8 "
        "bytes, each followed by a NUL byte, in the order of the train, validation and test "
        "splits (independent of the tokenizer; the full hashes are `text_sha256` in "
        "`data/<corpus>/<split>.json`). Equal fingerprints mean the same text in the same "
        "splits: two runs that differ in result but not here differ in something else. "
        + (
            f"Fingerprint of all corpora: `{data_fingerprint(hashes)[:16]}`."
            if complete
            else "Corpora marked – were prepared by an hdee that did not record the hash: "
            "`hdee prepare` records it when the corpus changes next."
        ),
        "",
        "| corpus | role | documents (train / validation / test) | tokens | text sha256 |",
        "| --- | --- | ---: | ---: | --- |",
        *rows,
        "",
    ]


def _with_data_section(markdown: str, general: str, plan: Plan, layout: RunLayout) -> str:
    lines = data_lines(general, plan, layout)
    if not lines:
        return markdown
    section = "\n".join(lines) + "\n"
    head, footer_mark, footer = markdown.rpartition("---\nMade by")
    return head + section + footer_mark + footer if footer_mark else markdown + "\n" + section


def repeats_section(config: ExperimentConfig, layout: RunLayout, method: str) -> list[str]:
    """The "Repeats" section from every repeat's results.json (none for one repeat)."""
    if config.run.repeats < 2:
        return []
    found: list[RepeatResults] = []
    missing: list[int] = []
    for index in range(config.run.repeats):
        path = layout.repeat(index).results
        if path.is_file():
            seed = config.for_repeat(index).training_seed
            found.append(RepeatResults(index, seed, EvaluationResults.read(path)))
        else:
            missing.append(index)
    tables = [final_perplexities(r.results, method) for r in found]
    domains = list(found[0].results.domains) if found else []
    return repeats_markdown(
        found,
        tables,
        method_title(method),
        method,
        domains,
        config.plan.baseline,
        missing,
        config.evaluation.min_effect,
    )


def write_report(config: ExperimentConfig, layout: RunLayout) -> Path:
    """Write RUN/report/report.md and its plots; returns the Markdown file's path."""
    plan = Plan.read(layout.plan)
    results = EvaluationResults.read(layout.results)
    path = layout.difficulty_record
    difficulty = DifficultyRecord.read(path) if path.is_file() else None
    layout.report.mkdir(parents=True, exist_ok=True)

    domains = plan.trained_domains + plan.held_out_domains
    methods = [m for m in headline_methods() if any(final_perplexities(results, m).values())]
    plots: dict[str, str] = {}  # title -> file, relative to the report

    def plot_path(name: str, title: str) -> Path:
        path = layout.report_plot(name)
        plots[title] = path.name
        return path

    plot_perplexity(
        final_perplexities(results, methods[0]),
        domains,
        plot_path("perplexity", "Test perplexity by domain and configuration"),
        f"Test perplexity ({method_title(methods[0])})",
    )
    weighed = first_posterior_method(results.methods)
    title = "Mean posterior weight of each expert per domain" + (
        f" ({method_title(weighed)})" if weighed else ""
    )
    if not plot_posteriors(results, domains, plot_path("posterior", title)):
        del plots[title]
    title = "Forgetting: each lane's experts on that lane's domains, iteration by iteration"
    if not plot_forgetting(plan, results, plot_path("forgetting", title)):
        del plots[title]
    title = "Training and validation loss of every job"
    if not plot_training_curves(plan, layout, plot_path("training_curves", title)):
        del plots[title]
    if layout.difficulty_plot.is_file():
        plots["Domain difficulty"] = str(
            Path("..") / layout.difficulty_plot.relative_to(layout.report.parent)
        )

    title = "Quality vs compute (perplexity against forward FLOPs per token)"
    if results.compute is None or not plot_pareto(results.compute, plot_path("pareto", title)):
        del plots[title]

    markdown = _with_tasks_section(
        _with_compute_section(
            render_markdown(
                plan,
                results,
                difficulty,
                config,
                plots,
                repeats_section(config, layout, methods[0]),
            ),
            results,
        ),
        layout,
    )
    markdown = _with_discovery_section(markdown, layout, difficulty)
    markdown = _with_data_section(markdown, config.data.general.name, plan, layout)
    write_text(layout.report_markdown, markdown)
    return layout.report_markdown
