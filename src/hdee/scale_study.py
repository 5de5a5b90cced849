"""The scale study's page (docs/results.md): the same experiment at several model widths, and
how each heterogeneous configuration's difference from the baseline moves with model size.

Inputs are finished runs, one per config of a family (configs/scale-study/: only the model's
width and the run directory differ). For every run, every repeat and every heterogeneous
configuration the page gives:

- the change in perplexity against the baseline as the geometric mean over domains
  (exp(mean over domains of log ppl(candidate) - log ppl(baseline)) - 1), trained and held-out
  domains apart, as mean ± standard deviation over repeats;
- each domain's verdict against the baseline (`hdee.significance`: win / loss / equivalent /
  undecided by the paired-bootstrap interval and `evaluation.min_effect`), counted only where
  every repeat reads the same, else undecided (the rule of `hdee.repeats`);
- a plot of every domain's difference with its interval, repeat by repeat, against the M
  model's parameters.

Then each run's report headline and repeats sections follow, re-rendered from its records by the
current code (`write_report`), so the page never mixes numerics of different versions. Nothing
on the page depends on the time or the machine it is written on: the same runs give the same
bytes (tests check it).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hdee.atomic import write_text
from hdee.config import ExperimentConfig, UsageError, load_config
from hdee.layout import RunLayout
from hdee.records import EvaluationResults, PairedDifference
from hdee.repeats import RepeatResults, mean_std
from hdee.shapes import Architecture, model_shapes, parameter_counts
from hdee.significance import Verdict, margin_text, verdict_between

VERDICTS: tuple[Verdict, ...] = ("win", "loss", "equivalent", "undecided")
KINDS = ("trained", "held-out")
# The sections of each run's report the page carries (the rest stays in RUN/report/report.md).
REPORT_SECTIONS = ("Trained domains", "Held-out domains", "Repeats", "Data")


@dataclass(frozen=True)
class StudyRun:
    """One finished run of the family: its config name, parameters and every repeat's results."""

    name: str  # the run directory's name, e.g. h64
    config: ExperimentConfig
    layout: RunLayout
    parameters: int  # total parameters of the M-size model (embeddings included)
    repeats: list[RepeatResults]


def read_study_run(run_dir: Path) -> StudyRun:
    """The finished run in `run_dir` (its own config.yaml); UsageError naming what is missing
    when it is not a run or not finished."""
    from hdee.pipeline import prepared_vocab

    layout = RunLayout.of(run_dir)
    if not layout.config.is_file():
        raise UsageError(f"{run_dir}: not a run directory (no {layout.config.name})")
    config = load_config(layout.config, overrides={"run_dir": str(layout.root)})
    repeats: list[RepeatResults] = []
    for index in range(config.run.repeats):
        path = layout.repeat(index).results
        if not path.is_file():
            raise UsageError(
                f"{run_dir}: repeat {index} has no results ({path}); finish the run first "
                f"(hdee run on its config, or hdee evaluate {run_dir})"
            )
        seed = config.for_repeat(index).training_seed
        repeats.append(RepeatResults(index, seed, EvaluationResults.read(path)))
    shapes = model_shapes(config.model)
    shape = shapes["M"] if "M" in shapes else next(iter(shapes.values()))
    total = parameter_counts(Architecture.of(shape, prepared_vocab(layout)[0]))[0]
    return StudyRun(layout.root.name, config, layout, total, repeats)


# ----------------------------------------------------------------------------------------------
# The numbers (pure)


def headline_method(results: EvaluationResults) -> str:
    """The method the report's headline uses: the first of the table the run scored."""
    from hdee.report import final_perplexities, headline_methods

    return next(m for m in headline_methods() if any(final_perplexities(results, m).values()))


def domains_of_kind(results: EvaluationResults, kind: str) -> list[str]:
    return [d for d, scores in results.domains.items() if scores.kind == kind]


def geometric_mean_change(
    table: dict[str, dict[str, float]], candidate: str, reference: str, domains: list[str]
) -> float | None:
    """exp(mean over `domains` of log(ppl_candidate / ppl_reference)) - 1; None without domains."""
    shared = [d for d in domains if d in table[candidate] and d in table[reference]]
    if not shared:
        return None
    logs = [math.log(table[candidate][d] / table[reference][d]) for d in shared]
    return math.expm1(sum(logs) / len(logs))


def pairs_of(
    results: EvaluationResults, method: str, domain: str
) -> dict[tuple[str, str], PairedDifference]:
    """(reference, candidate) -> the configurations' paired difference under `method`."""
    if results.uncertainty is None:
        return {}
    return {
        (p.reference, p.candidate): p
        for p in results.uncertainty.configurations
        if p.method == method and p.domain == domain
    }


def verdicts_across_repeats(
    repeats: list[EvaluationResults], candidate: str, reference: str, method: str, min_effect: float
) -> dict[str, Verdict | None]:
    """Domain -> the candidate's verdict against the reference where every repeat reads the
    same; "undecided" where they differ; None where some repeat has no interval."""
    out: dict[str, Verdict | None] = {}
    for domain in repeats[0].domains:
        found = {
            verdict_between(pairs_of(r, method, domain), candidate, reference, min_effect)
            for r in repeats
        }
        if None in found:
            out[domain] = None
        else:
            out[domain] = found.pop() if len(found) == 1 else "undecided"
    return out


@dataclass(frozen=True)
class ScaleRow:
    """One heterogeneous configuration of one run, against the run's baseline."""

    run: str
    parameters: int
    candidate: str
    change: dict[str, tuple[float, float] | None]  # kind -> (mean, std) over repeats
    verdicts: Counter[str]  # verdict -> domains (all kinds); "no interval" when one is missing


def scale_rows(runs: list[StudyRun]) -> list[ScaleRow]:
    rows: list[ScaleRow] = []
    for run in runs:
        from hdee.report import final_perplexities

        results = [r.results for r in run.repeats]
        method = headline_method(results[0])
        tables = [final_perplexities(r, method) for r in results]
        baseline = run.config.plan.baseline
        for candidate in (n for n in results[0].configurations if n != baseline):
            change: dict[str, tuple[float, float] | None] = {}
            for kind in KINDS:
                values = [
                    geometric_mean_change(t, candidate, baseline, domains_of_kind(r, kind))
                    for t, r in zip(tables, results, strict=True)
                ]
                present = [v for v in values if v is not None]
                change[kind] = mean_std(present) if len(present) == len(values) else None
            verdicts = verdicts_across_repeats(
                results, candidate, baseline, method, run.config.evaluation.min_effect
            )
            counts = Counter(v or "no interval" for v in verdicts.values())
            rows.append(ScaleRow(run.name, run.parameters, candidate, change, counts))
    return rows


# ----------------------------------------------------------------------------------------------
# The page


def _percent(value: tuple[float, float] | None, repeats: int) -> str:
    if value is None:
        return "–"
    mean, std = value
    return f"{100 * mean:+.1f}%" + (f" ± {100 * std:.1f}" if repeats > 1 else "")


def scale_table(runs: list[StudyRun], rows: list[ScaleRow]) -> list[str]:
    repeats = {run.name: len(run.repeats) for run in runs}
    lines = [
        "| run | parameters (M) | configuration | trained domains | held-out domains | "
        + " | ".join(VERDICTS)
        + " |",
        "| --- | ---: | --- | ---: | ---: | " + " | ".join("---:" for _ in VERDICTS) + " |",
    ]
    for row in rows:
        cells = [
            row.run,
            f"{row.parameters:,}",
            row.candidate,
            _percent(row.change["trained"], repeats[row.run]),
            _percent(row.change["held-out"], repeats[row.run]),
            *(str(row.verdicts.get(v, 0)) for v in VERDICTS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(row.verdicts.get("no interval") for row in rows):
        lines += ["", "Some domains have no interval (evaluation.bootstrap_resamples: 0)."]
    return lines


def _kept_title(title: str, titles: tuple[str, ...]) -> bool:
    return any(title == t or title.startswith(t + " (") for t in titles)


def report_sections(markdown: str, titles: tuple[str, ...] = REPORT_SECTIONS) -> str:
    """A report's headline (the text under its title, less the line naming the run's path) and
    its `## ` sections titled one of `titles` (or "title (...)"), one level down so that they
    sit under the page's run heading, without images (they stay with the run)."""
    kept: list[str] = []
    keep = False
    for line in markdown.splitlines():
        if line.startswith("# "):
            keep = True  # the headline paragraphs under the report's title
            continue
        if line.startswith("## "):
            keep = _kept_title(line[3:], titles)
        if not keep or re.match(r"^!\[.*\]\(.*\)$", line) or line.startswith("Run `"):
            continue
        kept.append("#" + line if line.startswith("#") else line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip() + "\n"


def plot_scale(runs: list[StudyRun], rows: list[ScaleRow], path: Path) -> bool:
    """Every domain's difference from the baseline with its interval, repeat by repeat, and the
    geometric mean over trained domains, against the M model's parameters; one panel per
    configuration. False when there is nothing to plot."""
    from hdee.report import _pyplot, _save  # the report's plotting set-up (Agg, atomic save)

    if not rows:
        return False
    plt = _pyplot()
    candidates = list(dict.fromkeys(row.candidate for row in rows))
    fig, axes = plt.subplots(1, len(candidates), figsize=(5 * len(candidates), 4), squeeze=False)
    for ax, candidate in zip(axes[0], candidates, strict=True):
        for run in runs:
            baseline = run.config.plan.baseline
            for k, repeat in enumerate(run.repeats):
                method = headline_method(repeat.results)
                domains = list(repeat.results.domains)
                for j, domain in enumerate(domains):
                    pair = pairs_of(repeat.results, method, domain).get((baseline, candidate))
                    if pair is None:
                        continue
                    # Spread the domains and repeats a little around the run's size.
                    x = run.parameters * (
                        1 + 0.04 * (j - len(domains) / 2) / len(domains) + 0.01 * k
                    )
                    y = 100 * math.expm1(pair.delta)
                    low, high = 100 * math.expm1(pair.low), 100 * math.expm1(pair.high)
                    ax.errorbar(x, y, [[y - low], [high - y]], fmt="o", ms=2, color="0.6", lw=0.6)
        own = [r for r in rows if r.candidate == candidate and r.change["trained"] is not None]
        xs = [r.parameters for r in own]
        ys = [100 * r.change["trained"][0] for r in own]  # type: ignore[index]
        errs = [100 * r.change["trained"][1] for r in own]  # type: ignore[index]
        ax.errorbar(xs, ys, errs, fmt="-s", color="black", label="geometric mean, trained domains")
        margin = 100 * runs[0].config.evaluation.min_effect
        ax.axhspan(-margin, margin, color="tab:green", alpha=0.15, label="equivalence margin")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("parameters of the M model")
        ax.set_ylabel(f"perplexity change vs {runs[0].config.plan.baseline} (%)")
        ax.set_title(candidate)
        ax.legend(fontsize=7)
    _save(fig, path)
    return True


def results_page(runs: list[StudyRun], plot_name: str | None) -> str:
    rows = scale_rows(runs)
    first = runs[0]
    margin = margin_text(first.config.evaluation.min_effect)
    repeats = sorted({len(run.repeats) for run in runs})
    lines = [
        "# Results: the scale study",
        "",
        "Regenerated by `python scripts/results-page.py RUN...` from the finished runs of "
        "`configs/scale-study/` with the code of this commit; `make scale-study` trains them "
        "first and then writes this page. Every run is the same experiment (corpus, plan, steps, evaluation) at a "
        "different model width. Whatever the numbers show is what the page says: nothing below "
        "is edited by hand.",
        "",
        "## Heterogeneous configurations against the baseline, by model size",
        "",
        f"Change in test perplexity against {first.config.plan.baseline} (geometric mean over "
        f"domains; negative: better), mean ± standard deviation (n - 1) over "
        f"{' or '.join(map(str, repeats))} repeats. The verdict columns count domains by the "
        f"paired-bootstrap interval against the baseline and the {margin} equivalence margin "
        "(evaluation.min_effect): win or loss when the interval lies wholly beyond the margin, "
        "equivalent when wholly inside, undecided otherwise; a domain counts as win, loss or "
        "equivalent only when every repeat reads the same.",
        "",
        *scale_table(runs, rows),
        "",
    ]
    if plot_name:
        lines += [f"![Perplexity change against model size]({plot_name})", ""]
    for run in runs:
        report = run.layout.report_markdown.read_text(encoding="utf-8")
        lines += [
            f"## {run.name}: {run.parameters:,} parameters (M), {len(run.repeats)} repeat(s)",
            "",
            f"Run directory `{run.name}` (config `configs/scale-study/{run.name}.yaml` for the "
            "study's runs); the full report, with its plots, is `report/report.md` there.",
            "",
            report_sections(report),
        ]
    return "\n".join(lines).rstrip() + "\n"


def write_results_page(run_dirs: list[Path], page: Path, evaluate: bool = False) -> Path:
    """Re-render every run's report with the current code (re-evaluating first when `evaluate`:
    the log-prob cache makes that cheap when only the reading changed), then write `page` and
    its plot beside it."""
    from hdee.report import write_report

    if not run_dirs:
        raise UsageError("results page: no run directory given")
    runs = [read_study_run(Path(p)) for p in run_dirs]
    if evaluate:
        from hdee.evaluate import evaluate_run
        from hdee.pipeline import repeat_views

        for run in runs:
            for repeat_config, repeat_layout in repeat_views(run.config, run.layout):
                evaluate_run(repeat_config, repeat_layout, progress=False)
        runs = [read_study_run(Path(p)) for p in run_dirs]
    for run in runs:
        write_report(run.config, run.layout)
    runs.sort(key=lambda r: r.parameters)
    plot = page.with_name(page.stem + "-scale.png")
    has_plot = plot_scale(runs, scale_rows(runs), plot)
    write_text(page, results_page(runs, plot.name if has_plot else None))
    return page
