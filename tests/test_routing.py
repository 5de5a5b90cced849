"""Routed (sparse) ensembles: the selection math against literal float64 definitions, the
routed scorer's forward passes counted by hooks, and budget routing's guarantee."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from hdee.ensemble import mixture_log_probs, posterior_weights
from hdee.ensemble_spec import plan_members
from hdee.generate import generate_ids
from hdee.inference import ensemble_label_log_probs
from hdee.routing import (
    budget_mask,
    feasible_subsets,
    route,
    routed_flops_per_token,
    routed_log_weights,
    routed_mixture,
    top_k_mask,
)
from hdee.scoring import label_log_probs
from hdee.shapes import forward_flops_per_token, training_flops_per_token
from train_helpers import ensembles_plan, live_ensemble, prefix_routing, random_llama

VOCAB = 40


def random_lp(experts: int, sequences: int, positions: int, seed: int = 0) -> torch.Tensor:
    """Label log-probs that differ per expert enough for the posterior to move."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(experts, sequences, positions, 6, generator=generator) * 2
    return torch.log_softmax(logits, dim=-1)[..., 0]


def literal_routed_mixture(
    lp: torch.Tensor, prior: list[float], mode: str, r: int, kept: torch.Tensor
) -> torch.Tensor:
    """The design note, one number at a time in float64: dense posterior before r, the
    posterior renormalised over each sequence's kept experts from r on."""
    experts, sequences, positions = lp.shape
    out = torch.empty(sequences, positions, dtype=torch.float64)
    for n in range(sequences):
        for t in range(positions):
            members = range(experts) if t < r else [j for j in range(experts) if kept[j, n]]
            unnormalised = {}
            for j in members:
                if mode == "prefix":
                    evidence = sum(float(lp[j, n, s]) for s in range(t))
                else:
                    evidence = float(lp[j, n, t - 1]) if t > 0 else 0.0
                unnormalised[j] = prior[j] * math.exp(evidence)
            total = sum(unnormalised.values())
            out[n, t] = math.log(
                sum(w / total * math.exp(float(lp[j, n, t])) for j, w in unnormalised.items())
            )
    return out


@pytest.mark.parametrize("mode", ["prefix", "updating"])
def test_routing_to_every_expert_is_the_dense_mixture(mode: str) -> None:
    lp = random_lp(4, 3, 12)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    kept, r = route(lp, prior, mode, "prefix", route_tokens=5, experts=4)
    assert r == 5 and bool(kept.all())
    dense = mixture_log_probs(lp.double(), prior, mode)
    torch.testing.assert_close(routed_mixture(lp, prior, mode, r, kept), dense)


@pytest.mark.parametrize("mode", ["prefix", "updating"])
@pytest.mark.parametrize("k", [1, 2])
def test_top_k_routing_is_the_renormalised_posterior_of_the_design_note(mode: str, k: int) -> None:
    lp = random_lp(4, 5, 9, seed=k)
    prior = [0.1, 0.2, 0.3, 0.4]
    kept, r = route(
        lp,
        torch.tensor(prior, dtype=torch.float64).log(),
        mode,
        "prefix",
        route_tokens=3,
        experts=k,
    )
    assert kept.sum(dim=0).tolist() == [k] * 5
    # Kept = the top k of the posterior at t = r (prior x likelihood of the first r labels).
    for n in range(5):
        if mode == "prefix":
            score = [math.log(prior[j]) + float(lp[j, n, :3].double().sum()) for j in range(4)]
        else:
            score = [math.log(prior[j]) + float(lp[j, n, 2]) for j in range(4)]
        top = sorted(range(4), key=lambda j: -score[j])[:k]
        assert sorted(kept[:, n].nonzero().flatten().tolist()) == sorted(top)
    expected = literal_routed_mixture(lp, prior, mode, r, kept)
    got = routed_mixture(lp, torch.tensor(prior, dtype=torch.float64).log(), mode, r, kept)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # Routing changed something: a routed mixture is not the dense one.
    assert not torch.allclose(
        got, mixture_log_probs(lp.double(), torch.tensor(prior, dtype=torch.float64).log(), mode)
    )


def test_routed_mixture_never_reads_routed_away_log_probs() -> None:
    lp = random_lp(3, 2, 8)
    kept, r = route(lp, None, "prefix", "prefix", route_tokens=4, experts=1)
    poisoned = lp.clone()
    poisoned[:, :, r:] = poisoned[:, :, r:].masked_fill(~kept[:, :, None], math.nan)
    torch.testing.assert_close(
        routed_mixture(poisoned, None, "prefix", r, kept),
        routed_mixture(lp, None, "prefix", r, kept),
    )


def test_prior_routing_keeps_the_top_k_of_the_prior_from_the_first_token() -> None:
    lp = random_lp(3, 4, 6)
    prior = torch.tensor([0.5, 0.1, 0.4])
    kept, r = route(lp, prior.log(), "prefix", "prior", route_tokens=3, experts=2)
    assert r == 0
    assert kept.tolist() == [[True] * 4, [False] * 4, [True] * 4]
    expected = literal_routed_mixture(lp, prior.tolist(), "prefix", 0, kept)
    torch.testing.assert_close(routed_mixture(lp, prior.log(), "prefix", 0, kept), expected)
    with pytest.raises(ValueError, match="uniform prior ranks no expert"):
        route(lp, None, "prefix", "prior", 3, experts=1)


def test_flops_per_token_counts_the_prefix_on_every_member() -> None:
    flops = [10.0, 20.0, 40.0]
    kept = torch.tensor([[True, False], [False, False], [False, True]])
    # Sequence 0: (4 * 70 + 6 * 10) / 10 = 34; sequence 1: (4 * 70 + 6 * 40) / 10 = 52.
    assert routed_flops_per_token(flops, kept, 4, 10) == pytest.approx((34 + 52) / 2)
    assert routed_flops_per_token(flops, torch.ones(3, 2, dtype=torch.bool), 0, 10) == 70


def test_budget_routing_never_exceeds_its_budget_and_takes_the_most_mass() -> None:
    generator = torch.Generator().manual_seed(3)
    flops = [1.0, 2.0, 3.0, 5.0, 8.0]
    log_weights = torch.randn(50, 5, generator=generator) * 3
    for budget in [1.0, 3.5, 6.0, 11.0, 19.0]:
        mask = budget_mask(log_weights, flops, budget)
        cost = mask.double() @ torch.tensor(flops, dtype=torch.float64)
        assert bool((cost <= budget).all()) and bool(mask.any(dim=1).all())
        weights = torch.softmax(log_weights.double(), dim=1)
        for n in range(50):
            best = max(
                sum(float(weights[n, j]) for j in subset)
                for size in range(1, 6)
                for subset in itertools.combinations(range(5), size)
                if sum(flops[j] for j in subset) <= budget
            )
            assert float(weights[n][mask[n]].sum()) == pytest.approx(best, abs=1e-12)
    assert feasible_subsets(flops, 19.0).shape == (31, 5)  # everything fits
    with pytest.raises(ValueError, match="fits no expert: the cheapest member needs 1"):
        budget_mask(log_weights, flops, 0.5)


def test_top_k_rejects_k_outside_the_members() -> None:
    with pytest.raises(ValueError, match=r"experts \(k\) must be in 1..3"):
        top_k_mask(torch.zeros(3), 4)


# ----------------------------------------------------------------------------------------------
# Routed execution


def counted_models(count: int) -> tuple[list[LlamaForCausalLM], list[list[int]]]:
    """Sharpened random experts, each with a hook recording how many input tokens every
    forward pass embedded (one entry per pass)."""
    models = [random_llama(VOCAB, seed, sharpen=6) for seed in range(count)]
    passes: list[list[int]] = [[] for _ in models]
    for model, log in zip(models, passes, strict=True):
        model.model.embed_tokens.register_forward_hook(
            lambda _m, args, _o, log=log: log.append(int(args[0].numel()))
        )
    return models, passes


def dense_label_lp(models: list[LlamaForCausalLM], batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([label_log_probs(m, batch).double() for m in models])


@pytest.mark.parametrize("mode", ["prefix", "updating"])
def test_routed_scorer_runs_only_kept_experts_after_the_prefix(mode: str) -> None:
    models, passes = counted_models(4)
    batch = torch.randint(0, VOCAB, (5, 13), generator=torch.Generator().manual_seed(1))
    lp = dense_label_lp(models, batch)
    for log in passes:
        log.clear()
    ensemble = live_ensemble(models, posterior=mode, routing=prefix_routing(1, 4))
    scores = ensemble_label_log_probs(ensemble, batch)
    assert scores.route_tokens == 4
    kept = scores.kept
    assert kept.sum(dim=0).tolist() == [1] * 5
    for j, log in enumerate(passes):
        rows = int(kept[j].sum())
        # The prefix pass on every row, then (only if some row kept it) its kept rows' rest.
        assert log == ([5 * 4] + ([rows * 8] if rows else []))
        assert scores.tokens_run[j] == 5 * 4 + rows * 8
    assert any(int(kept[j].sum()) == 0 for j in range(4))  # some expert never ran again
    # The routed execution computes exactly the routed mixture of the dense label log-probs.
    expected_kept, r = route(lp, None, mode, "prefix", 4, experts=1)
    assert torch.equal(kept, expected_kept)
    # fp32 scoring on both sides, in different chunks: equal to fp32 rounding.
    expected = routed_mixture(lp, None, mode, r, kept)
    torch.testing.assert_close(scores.log_probs, expected, rtol=1e-6, atol=1e-6)


def test_routed_scorer_with_every_expert_is_the_dense_ensemble() -> None:
    models, _ = counted_models(3)
    batch = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    dense = mixture_log_probs(dense_label_lp(models, batch), None, "prefix")
    for routing in [prefix_routing(3, 3), {"mode": "none"}]:
        scores = ensemble_label_log_probs(live_ensemble(models, routing=routing), batch)
        torch.testing.assert_close(scores.log_probs, dense)


def test_prior_routing_runs_the_prior_top_k_only() -> None:
    models, passes = counted_models(3)
    batch = torch.randint(0, VOCAB, (2, 7))
    prior = torch.tensor([0.2, 0.7, 0.1])
    ensemble = live_ensemble(models, prior=prior, routing={"mode": "prior", "top_k": 1})
    scores = ensemble_label_log_probs(ensemble, batch)
    assert passes == [[], [2 * 6], []]
    assert scores.tokens_run == [0, 12, 0]
    only = label_log_probs(models[1], batch).double()
    torch.testing.assert_close(scores.log_probs, only)


def test_budget_routed_scorer_keeps_within_the_budget() -> None:
    models, _ = counted_models(4)
    batch = torch.randint(0, VOCAB, (6, 9), generator=torch.Generator().manual_seed(4))
    flops = [1.0, 2.0, 3.0, 4.0]
    routing = {"mode": "budget", "route_tokens": 3, "flops": flops, "flop_budget": 4.5}
    scores = ensemble_label_log_probs(live_ensemble(models, routing=routing), batch)
    cost = scores.kept.double().T @ torch.tensor(flops, dtype=torch.float64)
    assert bool((cost <= 4.5).all())


# ----------------------------------------------------------------------------------------------
# Members


def test_members_all_is_every_expert_of_every_lane_and_iteration() -> None:
    plan = ensembles_plan(
        ["easy", "hard"],
        {"c": [{"easy": "e1", "hard": "h1"}, {"easy": "e2", "hard": "h1"}]},
        ["a"],
    )
    assert plan_members(plan, "c") == (2, {"easy": "e2", "hard": "h1"})
    assert plan_members(plan, "c", members="all") == (
        2,
        {"easy@1": "e1", "hard@1": "h1", "easy@2": "e2"},
    )
    assert plan_members(plan, "c", 1, "all") == (1, {"easy@1": "e1", "hard@1": "h1"})


# ----------------------------------------------------------------------------------------------
# Generation


def recomputed_routed(
    models: list[LlamaForCausalLM],
    prompt: list[int],
    steps: int,
    prior: torch.Tensor,
    mode: str,
    k: int,
    r: int,
) -> tuple[list[int], list[float]]:
    """Greedy routed decoding that re-runs every expert on the whole sequence each step (no
    cache) and weighs them with the evaluation math of `hdee.routing`."""
    sequence = list(prompt)
    chosen, log_probs = [], []
    for _ in range(steps):
        ids = torch.tensor([sequence])
        with torch.no_grad():
            full = torch.stack(
                [torch.log_softmax(m(input_ids=ids).logits[0].double(), -1) for m in models]
            )
        labels = full[:, :-1].gather(2, ids[0, 1:].expand(len(models), -1)[..., None]).squeeze(2)
        # A dummy last column stands for the next token's label position t = len(labels).
        lp = torch.cat([labels, torch.zeros(len(models), 1, dtype=torch.float64)], dim=1)[:, None]
        t = labels.shape[1]
        if t >= r:  # x_1..x_r known: routed, as in evaluation
            kept, _ = route(lp, prior.log(), mode, "prefix", r, experts=k)
            weights = routed_log_weights(lp, prior.log(), mode, r, kept)[:, 0, -1]
        else:  # every expert still runs: the dense posterior
            weights = posterior_weights(lp, prior.log(), mode)[:, 0, -1]
        mixture = torch.logsumexp(full[:, -1] + weights[:, None], dim=0)
        token = int(mixture.argmax())
        chosen.append(token)
        log_probs.append(float(mixture[token]))
        sequence.append(token)
    return chosen, log_probs


@pytest.mark.parametrize(
    ("mode", "prompt_length", "r"),
    [("prefix", 3, 6), ("prefix", 9, 4), ("updating", 5, 5)],  # route mid-generation or prompt
)
def test_routed_generation_equals_a_no_cache_recomputation(
    mode: str, prompt_length: int, r: int
) -> None:
    models, passes = counted_models(4)
    prompt = torch.randint(1, VOCAB, (prompt_length,), generator=torch.Generator().manual_seed(5))
    prior = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    steps = 8
    ensemble = live_ensemble(models, posterior=mode, prior=prior, routing=prefix_routing(2, r))
    generation = generate_ids(ensemble, prompt.tolist(), steps)
    assert generation.routed_at == r and len(generation.kept) == 2
    # Every expert read the first r tokens; afterwards only the kept ones ran.
    total = prompt_length + steps - 1  # the last chosen token is never fed back
    for j, log in enumerate(passes):
        assert generation.tokens_run[j] == sum(log)
        assert generation.tokens_run[j] == (total if j in generation.kept else r)
    tokens, log_probs = recomputed_routed(models, prompt.tolist(), steps, prior, mode, 2, r)
    assert generation.token_ids == tokens
    # float32 models: with and without a KV cache agree to ~1e-7.
    assert generation.token_log_probs == pytest.approx(log_probs, abs=1e-5)
    # Weights: one row per new token, zero for routed-away experts once routed.
    last = generation.weights[-1]
    assert sum(last) == pytest.approx(1.0)
    assert all(last[j] == 0.0 for j in range(4) if j not in generation.kept)


def test_generation_with_every_expert_kept_is_the_dense_generation() -> None:
    models, passes = counted_models(3)
    dense = generate_ids(live_ensemble(models), [1, 2, 3], 6)
    routed = generate_ids(live_ensemble(models, routing=prefix_routing(3, 2)), [1, 2, 3], 6)
    assert routed.token_ids == dense.token_ids
    assert routed.token_log_probs == pytest.approx(dense.token_log_probs)
    assert dense.routed_at is None and routed.routed_at == 2 and routed.kept == [0, 1, 2]
    with pytest.raises(ValueError, match=r"routing.top_k must be an integer in 1..3"):
        live_ensemble(models, routing=prefix_routing(4, 2))


def test_forward_flops_are_the_forward_third_of_training_flops() -> None:
    model = random_llama(VOCAB, 0)
    config = model.config
    non_embedding = sum(p.numel() for p in model.parameters()) - 2 * VOCAB * config.hidden_size
    # 2 x (non-embedding + LM head) + 4 x layers x hidden x context, and 1/3 of training.
    expected = 2 * (non_embedding + VOCAB * config.hidden_size) + 4 * 2 * 16 * 24
    assert forward_flops_per_token(config, 24) == expected
    assert 3 * forward_flops_per_token(config, 24) == training_flops_per_token(config, 24)
