"""The experiment config: validated once, errors name the key and say what was expected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hdee.config import ConfigError, load_config, parse_config


def test_valid_config_gets_paper_defaults(config_dict):
    config = parse_config(config_dict)
    assert [c.name for c in config.plan.configurations] == ["MHo-IHo", "MHo-IHe", "MHe-IHo"]
    assert config.data.split.train == 0.8
    assert config.evaluation.posterior == "prefix"
    assert config.evaluation.cached_prior_decay == 0.3


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.update(unknown_key=1), "unknown_key: unknown key"),
        (lambda r: r["data"].update(seq_len=1), "data.seq_len"),
        (lambda r: r["data"].update(seq_len="long"), "data.seq_len"),
        (
            lambda r: r["data"].update(split={"train": 0.5, "validation": 0.1, "test": 0.1}),
            "must sum to 1",
        ),
        (
            lambda r: r["data"]["domains"].append(dict(r["data"]["domains"][0])),
            "duplicate corpus name 'd0'",
        ),
        (lambda r: r["data"].pop("general"), "data.general: required key is missing"),
        (lambda r: r["plan"].update(held_out=["nope"]), "plan.held_out: 'nope'"),
        (lambda r: r["plan"].update(baseline="X"), "plan.baseline 'X'"),
        (lambda r: r["data"]["general"]["source"].update(type="ftp"), "data.general.source"),
        (lambda r: r["data"]["tokenizer"].update(kind="pretrained"), "name_or_path"),
        (lambda r: r["data"]["domains"][0].update(name="a/b"), "letters, digits"),
    ],
)
def test_bad_config_names_the_key(config_dict, mutate, expected):
    mutate(config_dict)
    with pytest.raises(ConfigError) as error:
        parse_config(config_dict, "exp.yaml")
    assert expected in str(error.value)
    assert str(error.value).startswith("exp.yaml")


@pytest.mark.parametrize("margin", [-0.01, 1.0, 2.5])
def test_min_effect_outside_zero_to_one_is_refused_naming_the_key(config_dict, margin):
    config_dict["evaluation"] = {"min_effect": margin}
    with pytest.raises(ConfigError) as error:
        parse_config(config_dict, "exp.yaml")
    message = str(error.value)
    assert message.startswith("exp.yaml") and "evaluation.min_effect" in message
    assert "[0, 1)" in message and str(margin) in message


def test_min_effect_defaults_to_half_a_percent_and_accepts_zero(config_dict):
    assert parse_config(config_dict).evaluation.min_effect == 0.005
    config_dict["evaluation"] = {"min_effect": 0}
    assert parse_config(config_dict).evaluation.min_effect == 0.0


def test_explicit_schedule_must_match_iterations(config_dict):
    config_dict["plan"]["schedule"] = {"easy": ["d0"], "moderate": ["d1"], "difficult": ["d2"]}
    with pytest.raises(ConfigError, match="plan.schedule.easy: 1 domains for 3 iterations"):
        parse_config(config_dict)


def test_load_config_resolves_paths_relative_to_the_file(tmp_path: Path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "c.yaml").write_text(
        "run_dir: out\n"
        "data:\n"
        "  general: {name: g, source: {type: local, paths: [text/g.txt]}}\n"
        "  domains:\n"
        "    - {name: a, source: {type: local, paths: [text/a.txt]}}\n"
    )
    config = load_config(tmp_path / "exp" / "c.yaml")
    assert config.run_dir == str((tmp_path / "exp" / "out").resolve())
    assert config.data.general.source.paths == [str(tmp_path / "exp" / "text/g.txt")]


def test_load_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_overrides_use_dotted_keys(config_dict):
    config = parse_config(config_dict, overrides={"plan.iterations": 2, "seed": 7})
    assert config.plan.iterations == 2 and config.seed == 7


def test_every_shipped_config_loads():
    """A shipped config that no longer validates is a broken promise to users."""
    root = Path(__file__).resolve().parents[1] / "configs"
    configs = sorted(root.glob("*.yaml"))
    assert configs, "configs/ holds no YAML files"
    for path in configs:
        load_config(path)


# ----------------------------------------------------------------------------------------------
# Nothing silently wrong: duplicate keys, infinite numbers, empty files, list overrides

MINIMAL = (
    "run_dir: out\n"
    "data:\n"
    "  general: {name: g, source: {type: local, paths: [g]}}\n"
    "  domains:\n"
    "    - {name: a, source: {type: local, paths: [a]}}\n"
)


def test_a_duplicate_top_level_block_is_refused_with_file_line_and_key(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL + "plan:\n  iterations: 1\nseed: 1\nplan:\n  iterations: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}:9:")  # the second `plan:` is on line 9
    assert "duplicate key 'plan'" in message and "first given on line 6" in message


def test_a_duplicate_nested_key_is_refused_with_its_key_path(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(
        MINIMAL + "seeds:\n  training:\n    steps: 12\n    lr: 0.001\n    steps: 5000\n"
    )
    with pytest.raises(ConfigError, match=r"c\.yaml:10: duplicate key 'seeds\.training\.steps'"):
        load_config(path)


def test_a_duplicate_key_inside_a_list_item_names_the_item(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL + "    - {name: b, name: c, source: {type: local, paths: [b]}}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'data\.domains\.1\.name'"):
        load_config(path)


def test_yaml_merge_keys_may_override(tmp_path: Path):
    """`<<: *base` followed by the same key is YAML's override idiom, not a duplicate."""
    path = tmp_path / "c.yaml"
    path.write_text(
        MINIMAL
        + "seeds:\n  training: &base {steps: 12, lr: 0.001}\n"
        + "experts:\n  training:\n    <<: *base\n    steps: 5\n"
    )
    config = load_config(path)
    assert config.experts.training.steps == 5 and config.experts.training.lr == 0.001


def test_an_empty_file_says_so(tmp_path: Path):
    for text in ("", "# only a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
            load_config(path)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_infinite_numbers_are_refused_with_the_key(tmp_path: Path, value: str):
    path = tmp_path / "c.yaml"
    path.write_text(MINIMAL + f"model:\n  rope_theta: {value}\n")
    with pytest.raises(ConfigError, match="model.rope_theta: Input should be a finite number"):
        load_config(path)


def test_infinite_numbers_are_refused_through_overrides(config_dict):
    with pytest.raises(ConfigError, match="seeds.training.lr: Input should be a finite number"):
        parse_config(config_dict, "exp.yaml", overrides={"seeds.training.lr": float("inf")})
    with pytest.raises(ConfigError, match=r"plan.budget_tolerance: Input should be a finite"):
        parse_config(config_dict, "exp.yaml", overrides={"plan.budget_tolerance": float("inf")})


@pytest.mark.parametrize(
    "schedule",
    [
        {"easy": ["d0", "d0"], "moderate": ["d1", "d2"], "difficult": ["d3", "d4"]},
        {"easy": ["d0", "d1"], "moderate": ["d2", "d3"], "difficult": ["d4", "d0"]},
    ],
)
def test_a_domain_appears_once_in_an_explicit_schedule(config_dict, schedule):
    config_dict["plan"].update(iterations=2, schedule=schedule)
    with pytest.raises(ConfigError, match="'d0' is already scheduled in plan.schedule.easy"):
        parse_config(config_dict)


def test_overrides_reach_list_items_by_index(config_dict):
    config = parse_config(
        config_dict,
        overrides={
            "plan.configurations": [
                {"name": "A", "sizes": {"easy": "M"}, "steps": {"easy": 4}},
                {"name": "B", "sizes": {"easy": "M"}, "steps": {"easy": 4}},
            ],
            "plan.baseline": "A",
            "plan.configurations.1.steps.easy": 300,
            "data.domains.0.source.paths.0": "elsewhere",
        },
    )
    assert config.plan.configurations[1].steps == {"easy": 300}
    assert config.plan.configurations[0].steps == {"easy": 4}
    assert config.data.domains[0].source.paths == ["elsewhere"]


@pytest.mark.parametrize(
    ("dotted", "expected"),
    [
        ("data.domains.12.name", r"data.domains has 12 item\(s\) \(0 to 11\), no item 12"),
        ("data.domains.first.name", "data.domains is a list; expected an item number"),
        ("plan.configurations.1.steps.easy", "plan.configurations is not in the config file"),
        ("run_dir.x", "run_dir is not a mapping or a list"),
        ("plan..iterations", "empty key"),
    ],
)
def test_bad_list_overrides_say_what_is_wrong(config_dict, dotted, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config(config_dict, overrides={dotted: 3})


def test_each_runner_kind_has_its_own_keys(config_dict):
    from hdee.config import LocalRunnerConfig, RayRunnerConfig

    assert isinstance(parse_config(config_dict).runner, LocalRunnerConfig)  # no runner: local
    ray = parse_config({**config_dict, "runner": {"kind": "ray", "cpus_per_job": 2}}).runner
    assert isinstance(ray, RayRunnerConfig) and ray.cpus_per_job == 2 and ray.address is None
    # A run directory's config.yaml from before runner kinds wrote every key, unset ones too.
    old = {"kind": "local", "workers": 1, "gpus_per_job": 1, "cpus_per_job": None, "address": None}
    assert parse_config({**config_dict, "runner": old}).runner == LocalRunnerConfig(workers=1)
    old_ray = {"kind": "ray", "workers": 0, "gpus_per_job": 1, "cpus_per_job": None, "address": "a"}
    assert parse_config({**config_dict, "runner": old_ray}).runner.address == "a"
    for runner, key in [
        ({"kind": "ray", "workers": 4}, "runner.ray.workers"),
        ({"kind": "local", "address": "10.0.0.1:6379"}, "runner.local.address"),
        ({"kind": "slurm"}, "runner"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            parse_config({**config_dict, "runner": runner})
