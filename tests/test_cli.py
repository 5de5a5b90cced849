"""The `hdee` command's contract with its user: a config the planner will refuse is refused
before anything runs (exit 2, naming the file and key), --set changes only what a command
uses, number arguments are range-checked, and failures name the path they concern."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tiny_config_dict
from hdee.cli import _run_config, main


def write_config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("command", ["plan", "run"])
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"plan": {"iterations": 4}}, "plan.iterations: 4 iterations need 4 domains per class"),
        ({"seeds": {"sizes": ["XL"]}}, "seeds.sizes.0: unknown size 'XL'"),
        ({"difficulty": {"seed_size": "XL"}}, "difficulty.seed_size: unknown size 'XL'"),
    ],
)
def test_an_unplannable_config_is_refused_before_any_stage(
    tmp_path: Path, capsys, command: str, change: dict, expected: str
):
    raw = tiny_config_dict(tmp_path / "run")
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    config_path = write_config(tmp_path, raw)
    assert (
        main(
            [command, str(config_path), "--quiet"]
            if command == "run"
            else [command, str(config_path)]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{config_path}: {expected}" in err
    assert not (tmp_path / "run").exists(), "a stage ran before the config was checked"


def test_an_unknown_size_under_configurations_is_refused_with_exit_2(tmp_path: Path, capsys):
    raw = tiny_config_dict(tmp_path / "run")
    raw["plan"]["configurations"] = [
        {
            "name": "MHo-IHo",
            "sizes": {"easy": "M", "moderate": "M", "difficult": "XL"},
            "steps": dict.fromkeys(("easy", "moderate", "difficult"), 4),
        }
    ]
    config_path = write_config(tmp_path, raw)
    assert main(["run", str(config_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        f"{config_path}: plan.configurations.0.sizes.difficult ('MHo-IHo'): unknown size 'XL'"
        in err
    )
    assert not (tmp_path / "run").exists()


def test_unequal_budgets_are_refused_before_any_stage(tmp_path: Path, capsys):
    raw = tiny_config_dict(tmp_path / "run")
    config_path = write_config(tmp_path, raw)
    code = main(
        [
            "run",
            str(config_path),
            "--set",
            "plan.configurations=[{name: MHo-IHo, sizes: {easy: M, moderate: M, difficult: M}, steps: {easy: 4, moderate: 4, difficult: 4}}, {name: b, sizes: {easy: M, moderate: M, difficult: M}, steps: {easy: 4, moderate: 4, difficult: 4}}]",
            "--set",
            "plan.configurations.1.steps.easy=300",
            "--quiet",
        ]
    )
    assert code == 2
    assert "plan.budget_tolerance" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "setting", ["seed=3", "plan.iterations=1", "data.seq_len=64", "run_dir=/tmp/elsewhere"]
)
def test_evaluate_refuses_settings_that_would_change_what_was_trained(
    tmp_path: Path, capsys, setting: str
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config_dict(run)))
    assert main(["evaluate", str(run), "--set", setting, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--set {setting!r}: `hdee evaluate` only takes evaluation.* keys" in err


def test_evaluate_takes_evaluation_settings(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config_dict(run)))
    config = _run_config(str(run), ["evaluation.posterior=updating", "evaluation.batch_size=2"])
    assert config.evaluation.posterior == "updating" and config.evaluation.batch_size == 2


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (
            ["generate", "RUN", "--configuration", "C", "--prompt", "x", "--top-k", "0"],
            "--top-k: must be >= 1, got 0",
        ),
        (
            ["generate", "RUN", "--configuration", "C", "--prompt", "x", "--max-new-tokens", "-3"],
            "--max-new-tokens: must be >= 1, got -3",
        ),
        (
            ["generate", "RUN", "--configuration", "C", "--prompt", "x", "--temperature", "-0.5"],
            "--temperature: must be a finite number >= 0, got -0.5",
        ),
        (
            ["generate", "RUN", "--configuration", "C", "--prompt", "x", "--temperature", "nan"],
            "--temperature: must be a finite number",
        ),
        (
            ["generate", "RUN", "--configuration", "C", "--prompt", "x", "--iteration", "0"],
            "--iteration: must be >= 1, got 0",
        ),
        (
            ["generate", "RUN", "--configuration", "C", "--prompt", "x", "--seed", "-1"],
            "--seed: must be >= 0",
        ),
        (
            ["generate", "RUN", "--configuration", "C", "--prompt", "x", "--prior", "1,inf"],
            "weights must be finite",
        ),
        (["run", "c.yaml", "--workers", "-1"], "--workers: must be >= 0, got -1"),
        (["plan", "c.yaml", "--vocab-size", "0"], "--vocab-size: must be >= 1, got 0"),
        (
            ["plan", "c.yaml", "--vocab-size", "lots"],
            "--vocab-size: expected an integer, got 'lots'",
        ),
    ],
)
def test_number_arguments_are_range_checked(capsys, arguments: list[str], expected: str):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
