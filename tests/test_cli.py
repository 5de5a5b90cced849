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
        (["tasks", "RUN", "--tasks", "builtin", "--limit", "0"], "--limit: must be >= 1, got 0"),
        (["tasks", "RUN", "--tasks", "builtin", "--limit", "-5"], "--limit: must be >= 1, got -5"),
        (
            ["tasks", "RUN", "--tasks", "builtin", "--batch-size", "0"],
            "--batch-size: must be >= 1, got 0",
        ),
        (
            ["tasks", "RUN", "--tasks", "builtin", "--num-fewshot", "-2"],
            "--num-fewshot: must be >= 0, got -2",
        ),
    ],
)
def test_number_arguments_are_range_checked(capsys, arguments: list[str], expected: str):
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_bad_arguments_found_after_parsing_exit_2_runtime_failures_exit_1(
    tiny_cli_run: dict, tmp_path: Path, capsys
):
    """One exit-code rule (docs/cli.md): an argument naming nothing that exists is exit 2
    wherever it is found; a stage's missing input is a runtime failure, exit 1."""
    run = str(tiny_cli_run["run_dir"])
    config = str(tiny_cli_run["config_path"])
    (tmp_path / "bad.json").write_text("{}")
    bad = [
        (["run", config, "--from", "plan", "--until", "difficulty"], "--from plan comes after"),
        (["train", str(tmp_path / "none.json")], "none.json: spec file not found"),
        (["train", str(tmp_path / "bad.json")], "bad.json: not a training spec (kind: Field"),
        (["generate", run, "--configuration", "nope", "--prompt", "x"], "'nope' is not in the"),
        (
            ["generate", run, "--configuration", "MHe-IHo", "--iteration", "5", "--prompt", "x"],
            "'MHe-IHo' has iterations 1..1, not 5",
        ),
        (["export", run, str(tmp_path / "e"), "--configuration", "nope"], "'nope' is not in the"),
    ]
    for argv, expected in bad:
        assert main(argv) == 2, argv
        assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit) as parsed:  # below every iteration: argparse's range check
        main(["export", run, str(tmp_path / "e"), "--configuration", "MHe-IHo", "--iteration", "0"])
    assert parsed.value.code == 2 and "--iteration: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((Path(run) / "config.yaml").read_text())
    assert main(["report", str(empty)]) == 1  # no plan.json: a stage to run, not a bad flag
    assert "plan.json" in capsys.readouterr().err


def test_generation_longer_than_the_context_is_refused_before_any_model_loads(
    tiny_cli_run: dict, capsys, monkeypatch: pytest.MonkeyPatch
):
    import re

    import hdee.generate

    run = tiny_cli_run["run_dir"]
    argv = ["generate", str(run), "--configuration", "MHe-IHo", "--prompt", "the one"]
    loads = hdee.generate.build_ensemble

    def no_models(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model loaded before --max-new-tokens was checked")

    monkeypatch.setattr(hdee.generate, "build_ensemble", no_models)
    assert main([*argv, "--max-new-tokens", "100000000"]) == 2
    err = capsys.readouterr().err
    found = re.search(r"--max-new-tokens 100000000: must be in 1\.\.(\d+): the experts read", err)
    assert found, err
    prompt = int(re.search(r"the prompt \((\d+) tokens with the EOS before it\)", err).group(1))
    assert "at most 16 positions (max_position_embeddings in " in err and "config.json)" in err
    room = int(found.group(1))
    assert room == 16 - prompt + 1  # the last new token is never read
    assert main([*argv, "--max-new-tokens", str(room + 1)]) == 2
    capsys.readouterr()
    monkeypatch.setattr(hdee.generate, "build_ensemble", loads)
    assert main([*argv, "--max-new-tokens", str(room)]) == 0  # the whole context is usable


def test_a_config_that_no_longer_fits_the_difficulty_record_names_it(
    tiny_cli_run: dict, tmp_path: Path, capsys
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_cli_run["run_dir"], run)
    raw = yaml.safe_load(tiny_cli_run["config_path"].read_text())
    raw["run_dir"] = str(run)
    raw["plan"]["held_out"] = ["d4"]  # d3 was held out when the seeds ranked the domains
    config = write_config(tmp_path, raw)
    for argv in (["plan", str(config)], ["run", str(config), "--from", "plan", "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{config}: {run / 'difficulty' / 'difficulty.json'}: its classes were made" in err
        assert "d3: held-out (" in err and "`hdee run CONFIG` measures the classes again" in err
    assert main(["run", str(config), "--until", "difficulty", "--quiet"]) == 0
    assert main(["plan", str(config)]) == 0
