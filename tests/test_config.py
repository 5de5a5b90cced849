"""The experiment config: validated once, errors name the key and say what was expected."""

from __future__ import annotations

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
