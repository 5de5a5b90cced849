"""Difficulty classes from seed perplexities."""

from __future__ import annotations

import math

import pytest

from hdee.config import DifficultyConfig
from hdee.difficulty import classify, combine_seed_perplexities, difficulty_record, tercile_groups

PPL = {"a": 5.0, "b": 50.0, "c": 8.0, "d": 20.0, "e": 200.0, "f": 30.0, "g": 12.0}


def test_terciles_rank_easiest_first():
    classes, cuts = classify(PPL, DifficultyConfig(), trainable=["a", "b", "c", "d", "e", "f"])
    assert classes == {
        "a": "easy",
        "c": "easy",
        "d": "moderate",
        "f": "moderate",
        "b": "difficult",
        "e": "difficult",
    }
    assert cuts == pytest.approx([math.sqrt(8 * 20), math.sqrt(30 * 50)])


def test_terciles_ignore_held_out_domains():
    with_g, _ = classify(PPL, DifficultyConfig(), trainable=["a", "b", "c", "d", "e", "f"])
    assert "g" not in with_g


def test_tercile_groups_uneven():
    groups = tercile_groups(["a", "b", "c", "d"])
    assert [groups[d] for d in "abcd"] == ["easy", "easy", "moderate", "difficult"]


def test_thresholds_and_fixed():
    config = DifficultyConfig(method="thresholds", thresholds=(10, 40))
    classes, _ = classify(PPL, config, trainable=list(PPL))
    assert classes["a"] == "easy" and classes["f"] == "moderate" and classes["b"] == "difficult"
    fixed = DifficultyConfig(method="fixed", fixed={"a": "difficult", "b": "easy"})
    classes, _ = classify(PPL, fixed, trainable=["a", "b"])
    assert classes == {"a": "difficult", "b": "easy"}
    with pytest.raises(ValueError, match=r"no class for trained domain\(s\) \['c'\]"):
        classify(PPL, fixed, trainable=["a", "b", "c"])


def test_too_few_domains_for_terciles():
    with pytest.raises(ValueError, match="at least 3"):
        classify(PPL, DifficultyConfig(), trainable=["a", "b"])


def test_seeds_combine_by_geometric_mean():
    combined = combine_seed_perplexities({"S": {"x": 4.0}, "L": {"x": 16.0}})
    assert combined["x"] == pytest.approx(8.0)


def test_record_places_held_out_domains_by_cut_points():
    per_seed = {"M": PPL}
    record = difficulty_record(per_seed, DifficultyConfig(), list("abcdef"), ["g"])
    assert record.ranking[0] == "a" and record.ranking[-1] == "e"
    assert record.held_out_classes == {"g": "easy"}  # 12 < sqrt(8 * 20) = 12.6
    only_m = difficulty_record(
        {"M": PPL, "S": {k: v * 2 for k, v in PPL.items()}},
        DifficultyConfig(seed_size="M"),
        list("abcdef"),
        [],
    )
    assert only_m.seed_sizes == ["M"] and only_m.perplexity["a"] == 5.0


def test_an_earlier_record_fits_only_the_config_it_was_made_for(tmp_path):
    """record_conflict: the classes the config's settings give the record's perplexities must
    be the record's own; a domain added, a held-out list, a method or the seeds changed since
    are each named."""
    from conftest import tiny_config_dict
    from hdee.config import parse_config
    from hdee.difficulty import record_conflict

    def config(**changes):
        raw = tiny_config_dict(tmp_path / "run", n_domains=7, held_out=1)
        for section, values in changes.items():
            raw[section] = {**raw.get(section, {}), **values}
        return parse_config(raw)

    ppl = {f"d{i}": p for i, p in enumerate(PPL.values())}
    fitted = config()
    record = difficulty_record({"M": ppl}, fitted.difficulty, fitted.trainable_domains, ["d6"])
    assert record_conflict(record, fitted, ["M"]) is None
    assert record_conflict(record, fitted, ["M", "S"]) == (
        "it ranks the domains with seed(s) ['M'], the config now with ['M', 'S']"
    )
    assert record_conflict(record, config(difficulty={"seed_size": "M"}), ["M", "S"]) is None
    held = record_conflict(record, config(plan={"held_out": ["d5", "d6"]}), ["M"])
    assert (
        held.startswith("its classes were made with other settings") and "d5: moderate -> " in held
    )
    thresholds = config(difficulty={"method": "thresholds", "thresholds": [25.0, 40.0]})
    assert "d3: moderate -> easy" in record_conflict(record, thresholds, ["M"])
    grown = tiny_config_dict(tmp_path / "run", n_domains=8, held_out=2)
    assert record_conflict(record, parse_config(grown), ["M"]) == (
        "it has no seed perplexity for domain(s) ['d7'] (added to data.domains since)"
    )
