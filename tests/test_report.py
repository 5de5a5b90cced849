"""The report's counting: best configuration per domain, heterogeneous wins, ties."""

from __future__ import annotations

import pytest

from hdee.records import ComputeResults, EvaluationResults
from hdee.report import (
    _with_compute_section,
    best_per_domain,
    compute_points,
    final_perplexities,
    heterogeneous_wins,
    plot_pareto,
)

TABLE = {
    "MHo-IHo": {"math": 32.0, "law": 10.0, "wiki": 20.0},
    "MHo-IHe": {"math": 31.5, "law": 10.5, "wiki": 20.0},
    "MHe-IHo": {"math": 31.8, "law": 10.2, "wiki": 19.9999},
}


def test_best_per_domain_and_wins():
    best = best_per_domain(TABLE, "MHo-IHo")
    assert best["math"] == "MHo-IHe"
    assert best["law"] == "MHo-IHo"
    # 19.9999 vs 20.0 is a tie within 0.01%: no win for a heterogeneous configuration.
    assert best["wiki"] == "MHo-IHo"
    assert heterogeneous_wins(TABLE, "MHo-IHo") == (1, 3)


def test_a_clear_margin_is_a_win():
    table = {**TABLE, "MHe-IHo": {**TABLE["MHe-IHo"], "wiki": 19.0}}
    assert best_per_domain(table, "MHo-IHo")["wiki"] == "MHe-IHo"
    assert heterogeneous_wins(table, "MHo-IHo") == (2, 3)


def test_final_perplexities_reads_the_last_iteration():
    def iteration(perplexity: float) -> dict:
        score = {"perplexity": perplexity, "tokens": 10}
        return {"experts": {}, "domains": {"x": {"methods": {"uniform_prior": score}}}}

    results = EvaluationResults.model_validate(
        {
            "posterior": "prefix",
            "methods": ["uniform_prior"],
            "seq_len": 8,
            "cached_prior_decay": 0.3,
            "device": "cpu",
            "domains": {"x": {"kind": "trained", "test_windows": 1}},
            "configurations": {
                "A": {
                    "final_iteration": 2,
                    "iterations": {"1": iteration(9.0), "2": iteration(7.0)},
                }
            },
        }
    )
    assert final_perplexities(results, "uniform_prior") == {"A": {"x": 7.0}}
    assert final_perplexities(results, "cached_prior") == {"A": {}}


def compute_section(members: str = "latest") -> ComputeResults:
    def score(perplexity: float, flops: float, **extra: object) -> dict:
        return {"perplexity": perplexity, "flops_per_token": flops, "tokens": 10, **extra}

    def domain(single: float, top1: float, full: float) -> dict:
        entry = {
            "best_single": score(single, 1.0, experts=1, member="a"),
            "full": score(full, 6.0, experts=3),
            "routed": [score(top1, 2.0, experts=1, route_tokens=4)],
        }
        if members == "all":
            entry["latest"] = score(full * 1.5, 4.0, experts=2)
        return entry

    return ComputeResults.model_validate(
        {
            "members": members,
            "routing": "prefix",
            "route_tokens": 4,
            "prior": "uniform",
            "configurations": {
                "A": {
                    "iteration": 1,
                    "members": {"a": "j1", "b": "j2", "c": "j3"},
                    "flops_per_token": {"a": 1.0, "b": 2.0, "c": 3.0},
                    # Geometric means: single 20, top-1 12, full 10.
                    "domains": {"x": domain(10.0, 6.0, 5.0), "y": domain(40.0, 24.0, 20.0)},
                }
            },
        }
    )


def test_compute_points_are_geometric_means_with_the_gain_kept():
    (rows,) = compute_points(compute_section()).values()
    by_system = {row["system"]: row for row in rows}
    assert [row["system"] for row in rows] == ["best single", "top-1", "full"]  # by FLOPs
    assert by_system["top-1"]["perplexity"] == pytest.approx(12.0)
    assert by_system["full"]["perplexity"] == pytest.approx(10.0)
    # (20 - 12) / (20 - 10): top-1 keeps 80% of the full ensemble's gain.
    assert by_system["top-1"]["gain_retained"] == pytest.approx(0.8)
    assert by_system["best single"]["gain_retained"] == pytest.approx(0.0)


def test_compute_section_and_pareto_plot(tmp_path):
    results = EvaluationResults.model_validate(
        {
            "posterior": "prefix",
            "methods": [],
            "seq_len": 8,
            "cached_prior_decay": 0.3,
            "device": "cpu",
            "domains": {},
            "configurations": {},
            "compute": compute_section("all").model_dump(),
        }
    )
    markdown = _with_compute_section("# r\n\n---\nMade by x\n", results)
    assert "## Quality vs compute" in markdown
    assert "| A | top-1 | 12.00 | 2 | 0.33x | 80% |" in markdown
    assert "| A | y | 30.00 | 20.00 | -33.3% |" in markdown  # the forest serves y again
    assert markdown.endswith("---\nMade by x\n")
    assert plot_pareto(results.compute, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_data_section_fingerprints_each_corpus_text(tiny_finished_run, tmp_path):
    import hashlib
    import json
    import shutil

    from hdee.data.tokens import read_manifest
    from hdee.layout import SPLITS, RunLayout
    from hdee.records import Plan
    from hdee.report import data_fingerprint, data_lines

    layout = RunLayout.of(tiny_finished_run)
    plan = Plan.read(layout.plan)
    markdown = layout.report_markdown.read_text()
    assert "## Data" in markdown
    hashes = []
    for corpus in ["general", *plan.trained_domains, *plan.held_out_domains]:
        splits = [read_manifest(layout.tokens(corpus, s))["text_sha256"] for s in SPLITS]
        expected = hashlib.sha256("\n".join(splits).encode()).hexdigest()
        assert data_fingerprint(splits) == expected
        assert f"| {corpus} | " in markdown and f"`{expected[:16]}`" in markdown
        hashes.append(expected)
    assert f"Fingerprint of all corpora: `{data_fingerprint(hashes)[:16]}`" in markdown

    # A corpus prepared before the hash was recorded shows a dash and says how to get it.
    copy = tmp_path / "run"
    shutil.copytree(tiny_finished_run / "data", copy / "data")
    manifest = RunLayout.of(copy).manifest("general", "train")
    record = json.loads(manifest.read_text())
    del record["text_sha256"]
    manifest.write_text(json.dumps(record))
    lines = "\n".join(data_lines("general", plan, RunLayout.of(copy)))
    assert "| general | general | " in lines and "`–`" in lines
    assert "Fingerprint of all corpora" not in lines and "did not record the hash" in lines
    # Nothing prepared: no section at all.
    assert data_lines("general", plan, RunLayout.of(tmp_path / "empty")) == []
