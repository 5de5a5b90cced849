"""run.repeats: the experiment N times with other training seeds on the same prepared data.

One tiny run with `repeats: 2` (the CLI run's experiment, so its repeat 0 can be compared
with `tiny_cli_run`, a run of one repeat) and the cross-repeat win rule on synthetic intervals.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tiny_run_config
from hdee.config import ConfigError, parse_config
from hdee.layout import RunLayout
from hdee.records import EvaluationResults, PairedDifference, Plan, Uncertainty
from hdee.repeats import consistent_outcomes, mean_std
from hdee.significance import Outcome, configuration_outcomes


def small_experiment(tmp_path: Path) -> dict[str, Any]:
    """5 domains (2 held out), 1 iteration, two configurations of M experts (one seed per
    repeat): the least that still has a winner to count."""
    raw = tiny_run_config(tmp_path)
    raw["data"]["domains"] = raw["data"]["domains"][:5]
    raw["plan"]["held_out"] = ["d3", "d4"]
    raw["plan"]["iterations"] = 1
    raw["plan"]["configurations"] = raw["plan"]["configurations"][:2]  # MHo-IHo, MHo-IHe
    raw["plan"]["allow_unequal_budgets"] = True
    return raw


@pytest.fixture(scope="module")
def repeated_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A finished run with repeats: 2 through `hdee run --repeats 2`, with a count of how often
    prepare ran and which jobs really trained (in-process runner), then `hdee run` again."""
    from hdee import train
    from hdee.cli import main
    from hdee.data import prepare

    tmp_path = tmp_path_factory.mktemp("repeats")
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(yaml.safe_dump(small_experiment(tmp_path)))
    prepared: list[int] = []
    trained: list[str] = []
    real_prepare, real_train = prepare.prepare_data, train.run_training

    def counting_prepare(*args: Any, **kwargs: Any) -> Any:
        summary = real_prepare(*args, **kwargs)
        prepared.append(sum(e["status"] != "skipped" for e in summary["corpora"].values()))
        return summary

    def counting_train(spec: Any, **kwargs: Any) -> Any:
        if not Path(spec.output_dir, "result.json").is_file():
            trained.append(Path(spec.output_dir).name)
        return real_train(spec, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare, "prepare_data", counting_prepare)
        patch.setattr(train, "run_training", counting_train)
        assert main(["run", str(config_path), "--repeats", "2", "--quiet"]) == 0
        first = (list(prepared), list(trained))
        prepared.clear()
        trained.clear()
        assert main(["run", str(config_path), "--repeats", "2", "--quiet"]) == 0
        second = (list(prepared), list(trained))
    return {"run_dir": tmp_path / "run", "first": first, "second": second}


def test_repeats_share_prepared_data_and_train_each_job_once(repeated_run) -> None:
    layout = RunLayout.of(repeated_run["run_dir"])
    (prepare_calls, trained), (again_prepare, again_trained) = (
        repeated_run["first"],
        repeated_run["second"],
    )
    assert len(prepare_calls) == 1 and prepare_calls[0] > 0  # built once, for both repeats
    assert len(trained) == len(set(trained))  # no job id trained twice
    plans = [Plan.read(layout.repeat(k).plan) for k in range(2)]
    jobs = [set(plan.jobs) for plan in plans]
    assert jobs[0] and jobs[1] and not jobs[0] & jobs[1]  # every job depends on the seed
    assert set(trained) == jobs[0] | jobs[1]
    assert {p.name for p in layout.jobs.iterdir()} == jobs[0] | jobs[1]
    # Each repeat trains with its own seed; data and schedule seeds stay the run's.
    for k, plan in enumerate(plans):
        for job_id in plan.jobs:
            spec = yaml.safe_load(layout.job(job_id).spec.read_text())
            assert spec["seed"] == k
            assert spec["train_tokens"].startswith(str(layout.data))
    # The repeat's own outputs, and nothing of the shared ones, under repeats/1.
    repeat = layout.repeat(1)
    assert repeat.root == layout.root / "repeats" / "1"
    for path in (repeat.plan, repeat.difficulty_record, repeat.results, repeat.results_csv):
        assert path.is_file(), path
    assert sorted(p.name for p in repeat.root.iterdir()) == [
        "difficulty",
        "evaluation",
        "plan.json",
    ]
    assert repeat.data == layout.data and repeat.jobs == layout.jobs
    # A second `hdee run` does no work.
    assert again_prepare == [0] and again_trained == []


def test_repeat_zero_is_the_plan_of_one_repeat(repeated_run) -> None:
    """Repeat 0 of a repeated run is what a run of one repeat plans: same plan.json, same jobs."""
    from hdee.pipeline import make_plan

    layout = RunLayout.of(repeated_run["run_dir"])
    raw = yaml.safe_load(layout.config.read_text())
    assert raw["run"] == {"repeats": 2, "repeat": 0}
    single = parse_config({**raw, "run": {"repeats": 1}})
    assert make_plan(single, layout).model_dump() == Plan.read(layout.plan).model_dump()


def test_one_repeat_keeps_todays_layout_and_job_ids(tiny_cli_run) -> None:
    """A run of one repeat has no repeats/ folder and no repeats section, and plans exactly the
    jobs it planned before repeats existed (the hash of a plan made without them; it changes
    only with what a job id holds, which issue 14 last changed)."""
    import hashlib

    from conftest import tiny_config_dict
    from hdee.plan import build_plan

    single = RunLayout.of(tiny_cli_run["run_dir"])
    assert not single.repeats.exists()
    assert single.repeat(0) == single
    assert "## Repeats" not in single.report_markdown.read_text()
    config = parse_config(tiny_config_dict(Path("/nonexistent/run")))
    classes = {f"d{i}": ("easy", "moderate", "difficult")[i % 3] for i in range(9)}
    plan = build_plan(config, 300, classes=classes, manifests={"general": "g", "d0": "a"})
    assert (
        hashlib.sha256(plan.model_dump_json().encode()).hexdigest()
        == "f4487b1cf86ecc335e520ec2a6ade537497e934838f007065b2de7552bb4670c"
    )


def test_report_repeats_section_is_mean_and_std_of_each_repeat(repeated_run) -> None:
    layout = RunLayout.of(repeated_run["run_dir"])
    results = [EvaluationResults.read(layout.repeat(k).results) for k in range(2)]
    report = layout.report_markdown.read_text()
    section = report.split("## Repeats (2 runs of the experiment)", 1)[1].split("\n## ", 1)[0]
    assert "training seeds 0, 1" in section
    rows = [line for line in section.splitlines() if re.match(r"\| d\d", line)]
    header = next(line for line in section.splitlines() if line.startswith("| domain"))
    names = [c.strip() for c in header.strip("|").split("|")][2:-1]
    assert names == list(results[0].configurations)
    assert len(rows) == len(results[0].domains) == 5
    for row in rows:
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        domain = cells[0]
        for name, cell in zip(names, cells[2:-1], strict=True):
            values = [
                r.configurations[name].final.domains[domain].methods["uniform_prior"].perplexity
                for r in results
            ]
            mean, std = re.fullmatch(r"([\d.]+) ± ([\d.]+)", cell).groups()
            assert float(mean) == pytest.approx(statistics.fmean(values), abs=0.006)
            assert float(std) == pytest.approx(statistics.stdev(values), abs=0.006)
        # The result column follows the rule: the same reading in both repeats, else undecided.
        per_repeat = [
            configuration_outcomes(r.uncertainty, "uniform_prior", names, [domain], 0.005)[domain]
            for r in results
        ]
        expected = (
            per_repeat[0].describe()
            if per_repeat[0] == per_repeat[1]
            else "undecided (the repeats disagree)"
        )
        assert cells[-1] == expected
    # The stds are not all zero: the repeats really trained differently.
    assert any(not re.search(r"± 0\.00\b", row) for row in rows)


def pair(domain: str, reference: str, candidate: str, low: float, high: float) -> Any:
    return PairedDifference(
        domain=domain,
        method="uniform_prior",
        reference=reference,
        candidate=candidate,
        delta=(low + high) / 2,
        low=low,
        high=high,
    )


def uncertainty(pairs: list[Any]) -> Uncertainty:
    return Uncertainty(
        resamples=100,
        level=0.95,
        seed=0,
        iteration="final",
        domains={},
        configurations=pairs,
        methods=[],
    )


def test_a_result_across_repeats_is_the_same_reading_in_every_repeat() -> None:
    table = {"A": {"x": 10.0, "y": 10.0, "z": 10.0, "w": 10.0}, "B": {"x": 9.0, "y": 9.0}}
    table["B"].update(z=11.0, w=10.0)
    # x: B wins in both repeats; y: only in the first; z: A in one, B in the other;
    # w: equivalent (inside the 0.5% margin) in both.
    first = uncertainty(
        [pair("x", "A", "B", -0.2, -0.1), pair("y", "A", "B", -0.2, -0.1)]
        + [pair("z", "A", "B", 0.1, 0.2), pair("w", "A", "B", -0.001, 0.002)]
    )
    second = uncertainty(
        [pair("x", "A", "B", -0.3, -0.05), pair("y", "A", "B", -0.2, 0.1)]
        + [pair("z", "A", "B", -0.2, -0.1), pair("w", "A", "B", -0.003, 0.0)]
    )
    domains = ["x", "y", "z", "w"]
    agreed, with_intervals = consistent_outcomes(
        [table, table], [first, second], "uniform_prior", domains, 0.005
    )
    assert with_intervals
    assert agreed["x"] == Outcome(("B",), "win")
    assert agreed["y"] is None and agreed["z"] is None
    assert agreed["w"] == Outcome(("A", "B"), "equivalent")
    # With no margin, w is undecided in both repeats (neither interval is exactly zero).
    agreed, _ = consistent_outcomes([table, table], [first, second], "uniform_prior", domains, 0.0)
    assert agreed["w"] == Outcome(("A", "B"), "undecided")
    # Without intervals in some repeat: the lowest perplexity in every repeat, said so.
    other = {"A": {"x": 10.0, "y": 8.0, "z": 10.0, "w": 10.0}, "B": {"x": 9.0, "y": 9.0}}
    other["B"].update(z=10.0, w=10.0)
    agreed, with_intervals = consistent_outcomes(
        [table, other], [first, None], "uniform_prior", domains, 0.005
    )
    assert not with_intervals
    assert {d: o.winner if o else None for d, o in agreed.items()} == {
        "x": "B",
        "y": None,
        "z": None,
        "w": None,
    }


def test_mean_std_is_the_sample_standard_deviation() -> None:
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx(
        (statistics.fmean([1.0, 2.0, 4.0]), statistics.stdev([1.0, 2.0, 4.0]))
    )
    assert mean_std([3.0]) == (3.0, 0.0)


def test_run_repeats_is_validated(tmp_path: Path) -> None:
    raw = small_experiment(tmp_path)
    for bad, message in (
        ({"repeats": 0}, "run.repeats"),
        ({"repeats": 2, "repeat": 2}, "run.repeat 2 is not a repeat of run.repeats=2"),
        ({"repeat": -1}, "run.repeat"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({**raw, "run": bad})
    config = parse_config({**raw, "seed": 7, "run": {"repeats": 3}})
    assert [config.for_repeat(k).training_seed for k in range(3)] == [7, 8, 9]
    assert config.for_repeat(2).seed == 7  # splits and schedule keep the run's seed
