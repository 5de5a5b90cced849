"""`evaluate_run` on a tiny fake run directory: results, caching, and the cached prior's data."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

import hdee.evaluate as evaluate_module
from hdee.atomic import read_json
from hdee.config import ExperimentConfig, load_config, parse_config
from hdee.data.loaders import eval_batches
from hdee.data.tokens import load_tokens, write_tokens
from hdee.ensemble import perplexity
from hdee.evaluate import evaluate_run
from hdee.layout import RunLayout
from hdee.records import Plan
from hdee.scoring import label_log_probs
from train_helpers import ensembles_plan, random_llama

VOCAB = 48
SEQ_LEN = 8
TRAINED = ["alpha", "beta"]
HELD_OUT = ["gamma"]
METHODS = ["simple_average", "uniform_prior", "cached_prior", "single_experts"]
# Two configurations that share the moderate expert (as MHo-IHo and MHe-IHo share M-400).
PLAN_CONFIGURATIONS = {
    "homo": {"easy": "m_easy", "moderate": "m_mod", "difficult": "m_diff"},
    "hetero": {"easy": "s_easy", "moderate": "m_mod", "difficult": "l_diff"},
}


def write_split(layout: RunLayout, domain: str, split: str, seed: int, count: int = 60) -> None:
    # Each domain favours a different band of token ids, so experts and posteriors differ.
    rng = np.random.default_rng(seed)
    offset = 16 * (["alpha", "beta", "gamma"].index(domain))
    tokens = (offset + rng.integers(0, 16, size=count)).astype(np.uint16)
    write_tokens(layout.tokens(domain, split), tokens, {"vocab_size": VOCAB, "eos_token_id": 0})


def save_expert(layout: RunLayout, job_id: str, seed: int) -> None:
    model = random_llama(VOCAB, seed, layers=1, kv_heads=2)
    model.save_pretrained(layout.job(job_id).final, safe_serialization=True)


def make_config(run_dir: Path, **evaluation: Any) -> ExperimentConfig:
    corpus = {"source": {"type": "local", "paths": ["unused.txt"]}}
    raw = {
        "run_dir": str(run_dir),
        "data": {
            "seq_len": SEQ_LEN,
            "general": {"name": "general", **corpus},
            "domains": [{"name": name, **corpus} for name in TRAINED + HELD_OUT],
        },
        "plan": {"held_out": HELD_OUT},
        "evaluation": {
            "batch_size": 2,
            "cached_prior_sequences": 3,
            "max_test_sequences": 5,
            **evaluation,
        },
    }
    return parse_config(raw)


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    layout = RunLayout.of(tmp_path / "run")
    for i, domain in enumerate(TRAINED + HELD_OUT):
        for j, split in enumerate(["validation", "test"]):
            write_split(layout, domain, split, seed=10 * i + j)
    jobs = sorted({job for ensemble in PLAN_CONFIGURATIONS.values() for job in ensemble.values()})
    for seed, job_id in enumerate(jobs):
        save_expert(layout, job_id, seed)
    ensembles_plan(
        ["easy", "moderate", "difficult"],
        {name: [ensemble] for name, ensemble in PLAN_CONFIGURATIONS.items()},
        TRAINED,
        HELD_OUT,
        classes={"alpha": "easy", "beta": "difficult"},
    ).write(layout.plan)
    return layout.root


def evaluate(run_dir: Path, config: ExperimentConfig) -> dict[str, Any]:
    """`evaluate_run`'s results as the JSON of results.json (the documented schema)."""
    results = evaluate_run(config, RunLayout.of(run_dir), progress=False)
    return results.model_dump(mode="json", exclude_none=True)


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the job id of every expert model the evaluator loads."""
    loads: list[str] = []
    original = evaluate_module.load_expert

    def load_expert(model_dir: Path, device: torch.device) -> LlamaForCausalLM:
        loads.append(model_dir.parent.name)
        return original(model_dir, device)

    monkeypatch.setattr(evaluate_module, "load_expert", load_expert)
    return loads


def test_results_for_every_configuration_domain_and_method(
    run_dir: Path, counted: list[str]
) -> None:
    results = evaluate(run_dir, make_config(run_dir))
    assert results["posterior"] == "prefix"
    assert set(results["configurations"]) == set(PLAN_CONFIGURATIONS)
    assert results["domains"]["gamma"]["kind"] == "held_out"
    assert results["domains"]["alpha"] == {
        "kind": "trained",
        "test_windows": 5,
        "validation_windows": 3,
    }
    for name, ensemble in PLAN_CONFIGURATIONS.items():
        entry = results["configurations"][name]["iterations"]["1"]
        assert entry["experts"] == ensemble
        for domain in TRAINED + HELD_OUT:
            scores = entry["domains"][domain]
            assert set(scores["methods"]) == {
                "simple_average",
                "uniform_prior",
                "cached_prior",
                "best_single",
            }
            for score in scores["methods"].values():
                assert score["tokens"] == 5 * SEQ_LEN
                assert 1.0 < score["perplexity"] < 10 * VOCAB
            assert list(scores["single_experts"]) == ["easy", "moderate", "difficult"]
            best = min(s["perplexity"] for s in scores["single_experts"].values())
            assert scores["methods"]["best_single"]["perplexity"] == best
            assert sum(scores["cached_prior"].values()) == pytest.approx(1.0)
            for weights in scores["mean_posterior"].values():
                assert sum(weights.values()) == pytest.approx(1.0)

    # The tidy CSV: per configuration and domain, 4 methods + 3 single experts.
    rows = list(csv.DictReader((run_dir / "evaluation" / "results.csv").open()))
    assert len(rows) == 2 * 3 * (4 + 3)
    assert set(rows[0]) == set(evaluate_module.CSV_COLUMNS)
    assert read_json(run_dir / "evaluation" / "results.json") == results


def test_each_expert_runs_once_and_cache_is_reused(run_dir: Path, counted: list[str]) -> None:
    config = make_config(run_dir)
    first = evaluate(run_dir, config)
    jobs = {job for ensemble in PLAN_CONFIGURATIONS.values() for job in ensemble.values()}
    # The shared moderate expert is loaded once, like every other expert.
    assert sorted(counted) == sorted(jobs)
    files = list((run_dir / "evaluation" / "logprobs").rglob("*.safetensors"))
    assert len(files) == len(jobs) * 3 * 2  # 3 domains x (test, validation)

    counted.clear()
    second = evaluate(run_dir, config)
    assert counted == []  # everything came from the cache
    assert second == first


def test_single_expert_perplexity_matches_a_direct_computation(run_dir: Path) -> None:
    results = evaluate(run_dir, make_config(run_dir))
    layout = RunLayout.of(run_dir)
    model = LlamaForCausalLM.from_pretrained(layout.job("m_mod").final, use_safetensors=True)
    tokens = load_tokens(layout.tokens("beta", "test"))
    lp = torch.cat([label_log_probs(model.eval(), b) for b in eval_batches(tokens, SEQ_LEN, 3, 5)])
    score = results["configurations"]["hetero"]["iterations"]["1"]["domains"]["beta"]
    assert score["single_experts"]["moderate"]["perplexity"] == pytest.approx(perplexity(lp))


def test_cached_prior_uses_validation_data_only(run_dir: Path) -> None:
    config = make_config(run_dir)
    before = evaluate(run_dir, config)
    # New test data for every domain: test perplexities change, the cached prior must not.
    layout = RunLayout.of(run_dir)
    for i, domain in enumerate(TRAINED + HELD_OUT):
        write_split(layout, domain, "test", seed=1000 + i)
    after = evaluate(run_dir, config)
    for name in PLAN_CONFIGURATIONS:
        old = before["configurations"][name]["iterations"]["1"]["domains"]
        new = after["configurations"][name]["iterations"]["1"]["domains"]
        for domain in TRAINED + HELD_OUT:
            assert new[domain]["cached_prior"] == old[domain]["cached_prior"]
            assert (
                new[domain]["methods"]["simple_average"]["perplexity"]
                != old[domain]["methods"]["simple_average"]["perplexity"]
            )


def test_config_from_run_dir_methods_posterior_and_every_iteration(run_dir: Path) -> None:
    layout = RunLayout.of(run_dir)
    plan = Plan.read(layout.plan)
    first = plan.configurations["homo"].ensembles[0]
    plan.configurations["homo"].ensembles = [
        {**first, "difficult": "l_diff"},
        first,  # iteration 1 uses another difficult expert
    ]
    plan.write(layout.plan)
    config = make_config(
        run_dir, methods=["uniform_prior"], posterior="updating", every_iteration=True
    )
    layout.config.write_text(yaml.safe_dump(config.to_dict()))
    results = evaluate(run_dir, load_config(layout.config))
    assert results["posterior"] == "updating"
    homo = results["configurations"]["homo"]
    assert homo["final_iteration"] == 2 and set(homo["iterations"]) == {"1", "2"}
    assert set(results["configurations"]["hetero"]["iterations"]) == {"1"}
    scores = homo["iterations"]["2"]["domains"]["alpha"]
    assert set(scores["methods"]) == {"uniform_prior"}
    # No cached prior: the validation split was never read or cached.
    assert not list((run_dir / "evaluation" / "logprobs").rglob("*.validation.safetensors"))


# ----------------------------------------------------------------------------------------------
# Quality vs compute: members and routing (hdee.routing)


def test_default_compute_section_has_full_and_best_single_with_their_flops(run_dir: Path) -> None:
    from transformers import LlamaConfig

    from hdee.shapes import forward_flops_per_token

    results = evaluate(run_dir, make_config(run_dir))
    compute = results["compute"]
    assert (compute["members"], compute["routing"], compute["route_tokens"]) == (
        "latest",
        "none",
        0,
    )
    hetero = compute["configurations"]["hetero"]
    layout = RunLayout.of(run_dir)
    flops = float(
        forward_flops_per_token(LlamaConfig.from_pretrained(layout.job("s_easy").final), SEQ_LEN)
    )
    assert hetero["flops_per_token"]["easy"] == flops
    scores = results["configurations"]["hetero"]["iterations"]["1"]["domains"]["beta"]
    beta = hetero["domains"]["beta"]
    assert beta["full"]["perplexity"] == pytest.approx(
        scores["methods"]["uniform_prior"]["perplexity"]
    )
    assert beta["full"]["flops_per_token"] == pytest.approx(sum(hetero["flops_per_token"].values()))
    best = scores["methods"]["best_single"]
    assert beta["best_single"]["perplexity"] == best["perplexity"]
    assert beta["best_single"]["flops_per_token"] == hetero["flops_per_token"][best["expert"]]
    assert "routed" not in beta or beta["routed"] == []


def test_prefix_routing_in_evaluate_is_the_routed_mixture_of_the_cache(run_dir: Path) -> None:
    from hdee.routing import route, routed_flops_per_token, routed_mixture

    config = make_config(run_dir, routing="prefix", route_tokens=3, experts=[1, 2, 5])
    results = evaluate(run_dir, config)
    layout = RunLayout.of(run_dir)
    entry = results["compute"]["configurations"]["homo"]
    jobs = list(entry["members"].values())
    flops = list(entry["flops_per_token"].values())
    cached = evaluate_module.LogProbCache(layout, config, torch.device("cpu"))
    for domain in TRAINED + HELD_OUT:
        lp = torch.stack([cached.get(job, domain, "test") for job in jobs])
        routed = entry["domains"][domain]["routed"]
        assert [r["experts"] for r in routed] == [1, 2]  # k = 5 > E = 3 is not a routing
        for score in routed:
            kept, r = route(lp, None, "prefix", "prefix", 3, experts=score["experts"])
            assert score["route_tokens"] == 3
            assert score["perplexity"] == pytest.approx(
                perplexity(routed_mixture(lp, None, "prefix", r, kept))
            )
            assert score["flops_per_token"] == pytest.approx(
                routed_flops_per_token(flops, kept, 3, SEQ_LEN)
            )
            assert score["flops_per_token"] < entry["domains"][domain]["full"]["flops_per_token"]
            assert sum(score["kept"].values()) == pytest.approx(score["experts"])


def test_members_all_evaluates_the_forest_and_the_latest_ensemble(run_dir: Path) -> None:
    layout = RunLayout.of(run_dir)
    plan = Plan.read(layout.plan)
    first = plan.configurations["homo"].ensembles[0]
    # Iteration 2 retrains the difficult lane (l_diff replaces m_diff).
    plan.configurations["homo"].ensembles = [first, {**first, "difficult": "l_diff"}]
    plan.write(layout.plan)
    results = evaluate(
        run_dir,
        make_config(run_dir, members="all", routing="budget", route_tokens=3, flop_budget=1e12),
    )
    homo = results["configurations"]["homo"]["iterations"]["2"]
    assert homo["experts"] == {
        "easy@1": "m_easy",
        "moderate@1": "m_mod",
        "difficult@1": "m_diff",
        "difficult@2": "l_diff",
    }
    assert set(homo["domains"]["alpha"]["single_experts"]) == set(homo["experts"])
    compute = results["compute"]["configurations"]["homo"]
    alpha = compute["domains"]["alpha"]
    assert alpha["full"]["experts"] == 4 and alpha["latest"]["experts"] == 3
    assert alpha["latest"]["flops_per_token"] < alpha["full"]["flops_per_token"]
    # A budget that fits everything keeps everything: the full ensemble's numbers.
    (budget,) = alpha["routed"]
    assert budget["perplexity"] == pytest.approx(alpha["full"]["perplexity"])


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        ({"routing": "budget"}, "evaluation.flop_budget: required with routing: budget"),
        ({"flop_budget": 5.0}, "only used with routing: budget"),
        ({"routing": "prior", "methods": ["uniform_prior"]}, "a uniform prior ranks no expert"),
        ({"experts": [0]}, "evaluation.experts: expected a non-empty list"),
        ({"experts": [1, 1]}, "lists a k twice"),
        (
            {"routing": "prefix", "route_tokens": SEQ_LEN},
            "evaluation.route_tokens: 8 leaves nothing",
        ),
        ({"members": "some"}, "members"),
    ],
)
def test_routing_keys_are_validated(
    run_dir: Path, evaluation: dict[str, Any], message: str
) -> None:
    from hdee.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=message):
        make_config(run_dir, **evaluation)


def test_precision_is_part_of_the_cache_key(run_dir: Path) -> None:
    layout = RunLayout.of(run_dir)
    keys = {
        precision: evaluate_module.LogProbCache(
            layout, make_config(run_dir, precision=precision), torch.device("cpu")
        ).metadata("m_mod", "alpha", "test")
        for precision in ("fp32", "bf16")
    }
    assert keys["fp32"]["precision"] == "fp32" and keys["bf16"]["precision"] == "bf16"
    assert keys["fp32"] != keys["bf16"]


def test_a_bad_precision_is_a_config_error_naming_the_field(run_dir: Path) -> None:
    with pytest.raises(Exception, match=r"evaluation\.precision"):
        make_config(run_dir, precision="fp16")
