"""Forgetting across iterations and the held-out lane assignment, on a copy of the shared tiny
two-iteration run re-evaluated with `evaluation.every_iteration`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hdee.config import load_config
from hdee.evaluate import evaluate_run
from hdee.forgetting import forgetting_rows, held_out_assignment
from hdee.layout import RunLayout
from hdee.records import Plan
from hdee.report import write_report


@pytest.fixture(scope="module")
def every_iteration_run(tiny_finished_run: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("forgetting") / "run"
    shutil.copytree(tiny_finished_run, run_dir)
    layout = RunLayout.of(run_dir)
    config = load_config(
        layout.config,
        overrides={"run_dir": str(run_dir), "evaluation.every_iteration": True},
    )
    results = evaluate_run(config, layout, progress=False)
    return config, layout, Plan.read(layout.plan), results


def test_forgetting_rows_compare_each_domain_after_its_iteration_and_at_the_end(
    every_iteration_run,
) -> None:
    _, _, plan, results = every_iteration_run
    assert plan.iterations == 2
    rows = forgetting_rows(plan, results)
    assert len(rows) == len(results.configurations) * len(plan.lanes) * 2
    for row in rows:
        iterations = results.configurations[row.configuration].iterations
        own = iterations[row.iteration].domains[row.domain].single_experts[row.lane]
        last = iterations[2].domains[row.domain].single_experts[row.lane]
        assert row.domain == plan.schedule[row.lane][row.iteration - 1]
        assert (row.after, row.final) == (own.perplexity, last.perplexity)
        # The expert after iteration 1 is not the final one: different jobs.
        assert (own.job_id == last.job_id) == (row.iteration == 2)
        if row.iteration == 2:
            assert row.forgetting == 0.0
    assert any(row.forgetting != 0.0 for row in rows if row.iteration == 1)


def test_report_has_the_forgetting_table_plot_and_lane_assignment(every_iteration_run) -> None:
    config, layout, plan, results = every_iteration_run
    markdown = write_report(config, layout).read_text()
    assert "## Forgetting across iterations" in markdown
    assert "| configuration | lane | domain | iteration |" in markdown
    assert layout.report_plot("forgetting").is_file()
    assert "![Forgetting" in markdown
    assignment = held_out_assignment(plan, results)
    assert set(assignment) == set(plan.held_out_domains)
    for domain, chosen in assignment.items():
        for name, (lane, weight) in chosen.items():
            weights = (
                results.configurations[name].final.domains[domain].mean_posterior["uniform_prior"]
            )
            assert weight == max(weights.values()) and weights[lane] == weight
        cells = " | ".join(f"{lane} ({weight:.2f})" for lane, weight in chosen.values())
        assert f"| {domain} | {cells} |" in markdown


def test_without_every_iteration_the_report_says_forgetting_was_not_measured(
    tiny_finished_run: Path,
) -> None:
    markdown = (tiny_finished_run / "report" / "report.md").read_text()
    assert "Not measured: set `evaluation.every_iteration: true`" in markdown
