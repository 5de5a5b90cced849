"""`hdee demo --quick` end to end: the whole experiment on the built-in real-text corpus."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from hdee.atomic import read_json
from hdee.cli import main
from hdee.config import load_config
from hdee.layout import RunLayout
from hdee.records import TasksResults


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Overrides conftest's: the demo trains for a minute and uses every core, as a user's."""
    yield


def test_quick_demo_runs_the_whole_experiment(tmp_path: Path):
    run_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--run-dir", str(run_dir), "--quiet"]) == 0
    layout = RunLayout.of(run_dir)

    config = load_config(run_dir / "demo.yaml")  # the written config is a valid, usable one
    plan = read_json(layout.plan)
    assert len(plan["trained_domains"]) >= 9 and len(plan["held_out_domains"]) >= 3
    assert set(plan["configurations"]) == {"MHo-IHo", "MHo-IHe", "MHe-IHo"}
    assert len(plan["schedule"]["easy"]) == config.plan.iterations == 3

    difficulty = read_json(layout.difficulty_record)
    ranked = [difficulty["perplexity"][d] for d in difficulty["ranking"]]
    assert ranked == sorted(ranked) and ranked[-1] > ranked[0]

    results = read_json(layout.results)
    vocab = config.data.tokenizer.vocab_size
    for configuration in results["configurations"].values():
        final = configuration["iterations"]["3"]
        domains = plan["trained_domains"] + plan["held_out_domains"]
        perplexities = [
            final["domains"][d]["methods"]["uniform_prior"]["perplexity"] for d in domains
        ]
        # Trained models beat a uniform guess over the vocabulary on every domain, and by a
        # wide margin on average (held-out oddities such as locale files stay hard).
        assert max(perplexities) < vocab
        assert math.exp(sum(map(math.log, perplexities)) / len(perplexities)) < vocab / 2

    report = (layout.report_markdown).read_text()
    assert "## Trained domains" in report and "## Held-out domains" in report
    # The demo ends with the built-in downstream tasks, scored for every configuration.
    tasks = TasksResults.read(layout.tasks_results)
    assert {"MHo-IHo", "MHo-IHe", "MHe-IHo"} <= set(tasks.systems)
    assert set(tasks.tasks) == {"hdee_next_chunk", "hdee_cloze"}
    assert "## Downstream tasks" in report

    # Running it again resumes: nothing is retrained.
    before = {p: p.stat().st_mtime_ns for p in layout.jobs.glob("*/result.json")}
    assert main(["demo", "--quick", "--run-dir", str(run_dir), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in layout.jobs.glob("*/result.json")} == before
