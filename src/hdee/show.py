"""What hdee shows about a run: the plan's tables (`hdee plan`, stage 'plan') and the prepared
data (`hdee prepare`, stage 'prepare'). Presentation only: the numbers come from the planner
and from the manifests `hdee prepare` wrote; how tables look is console.py's business."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from hdee.config import ExperimentConfig
from hdee.console import print_table, status
from hdee.data.splits import SPLIT_NAMES
from hdee.data.tokens import read_manifest
from hdee.formatting import si
from hdee.layout import RunLayout
from hdee.records import Plan


def print_plan(plan: Plan, console: Console | None = None, layout: RunLayout | None = None) -> None:
    """Tables of configurations (budgets) and jobs; job status when a run directory is given."""
    if plan.provisional:
        status(
            "[yellow]Provisional plan:[/] domains are assigned to lanes after the seeds rank "
            "them (stage 'difficulty'); budgets and seeds below are final.",
            console,
        )
    configurations = []
    for name, c in plan.configurations.items():
        gap = (
            f"{plan.relative_budget_gap(name, 'proxy'):+.2%} / "
            f"{plan.relative_budget_gap(name, 'flops'):+.2%}"
        )
        configurations.append(
            [
                name + (" (baseline)" if name == plan.baseline else ""),
                *[f"{c.sizes[lane]} / {c.steps[lane]}" for lane in plan.lanes],
                si(c.budget.proxy),
                si(c.budget.flops),
                gap,
            ]
        )
    print_table(
        [
            "configuration",
            *[f"{lane} size/steps" for lane in plan.lanes],
            "|FFN| x steps",
            "train FLOPs",
            "vs baseline (proxy / FLOPs)",
        ],
        configurations,
        title="Configurations (budget of all expert jobs)",
        console=console,
    )
    status(
        f"Seeds ({', '.join(plan.seeds)}), not in the expert budget: "
        f"|FFN| x steps {si(plan.seed_budget.proxy)}, train FLOPs {si(plan.seed_budget.flops)}",
        console,
    )
    jobs = [
        [
            job.job_id,
            job.kind,
            job.size,
            job.steps,
            job.domain,
            job.lane or "",
            job.iteration or "",
            job.init_from or "",
            layout.job(job.job_id).status() if layout is not None else "",
        ]
        for job in plan.jobs.values()
    ]
    print_table(
        ["job", "kind", "size", "steps", "domain", "lane", "iter", "branches from", "status"],
        jobs,
        title=f"Jobs ({len(plan.jobs)} unique)",
        right={"steps", "iter"},
        console=console,
    )


def prepared_counts(config: ExperimentConfig, layout: RunLayout) -> dict[str, dict[str, Any]]:
    """corpus -> split -> {"documents", "tokens"}, read from the manifests `hdee prepare` wrote
    (a ValueError names a manifest that is missing or not hdee's)."""
    return {
        corpus.name: {
            split: {
                "documents": manifest["num_documents"],
                "tokens": manifest["num_tokens"],
            }
            for split in SPLIT_NAMES
            for manifest in [read_manifest(layout.tokens(corpus.name, split))]
        }
        for corpus in [config.data.general, *config.data.domains]
    }


def print_prepared(
    config: ExperimentConfig,
    layout: RunLayout,
    statuses: dict[str, str] | None = None,
    console: Console | None = None,
) -> None:
    """Documents and tokens per corpus and split, as the manifests on disk say, with a total
    row; `statuses` (corpus -> rebuilt / skipped, from prepare_data) adds a column."""
    counts = prepared_counts(config, layout)
    columns = ["corpus", *(["status"] if statuses else [])]
    numeric = [f"{split} {what}" for split in SPLIT_NAMES for what in ("docs", "tokens")]
    rows = []
    for name, splits in counts.items():
        values = [splits[s][k] for s in SPLIT_NAMES for k in ("documents", "tokens")]
        rows.append([name, *([statuses.get(name, "")] if statuses else []), *values])
    totals = [sum(row[len(columns) + i] for row in rows) for i in range(len(numeric))]
    rows.append(["total", *([""] if statuses else []), *totals])
    print_table(
        columns + numeric,
        [[*row[: len(columns)], *(f"{v:,}" for v in row[len(columns) :])] for row in rows],
        title=f"Prepared data ({layout.data})",
        right=set(numeric),
        console=console,
    )
