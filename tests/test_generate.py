"""Ensemble generation: KV-cached mixture vs the definitions, and vs HF generate for one expert."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from hdee.ensemble import posterior_weights
from hdee.generate import generate_ids
from train_helpers import live_ensemble, random_llama

VOCAB = 40


def tiny_llama(seed: int) -> LlamaForCausalLM:
    # Sharpened so greedy choices are stable.
    return random_llama(VOCAB, seed, sharpen=20)


def test_one_expert_greedy_equals_hf_generate() -> None:
    model = tiny_llama(0)
    prompt = [3, 17, 5, 9]
    ours = generate_ids(live_ensemble([model]), prompt, max_new_tokens=10).token_ids
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10
        )
    assert ours == theirs[0, len(prompt) :].tolist()


def recomputed_without_cache(
    models: list[LlamaForCausalLM], prompt: list[int], steps: int, prior: torch.Tensor, mode: str
) -> tuple[list[int], list[float]]:
    """Greedy ensemble decoding that re-runs every expert on the whole sequence each step and
    takes the posterior from `hdee.ensemble.posterior_weights`."""
    sequence = list(prompt)
    chosen, log_probs = [], []
    for _ in range(steps):
        ids = torch.tensor([sequence])
        with torch.no_grad():
            full = torch.stack(
                [torch.log_softmax(m(input_ids=ids).logits[0].double(), -1) for m in models]
            )
        labels = full[:, :-1].gather(2, ids[0, 1:].expand(len(models), -1)[..., None]).squeeze(2)
        # A dummy last column stands for the next token: its weight uses every label before it.
        lp = torch.cat([labels, torch.zeros(len(models), 1, dtype=torch.float64)], dim=1)
        weights = posterior_weights(lp[:, None, :], prior.log(), mode)[:, 0, -1]  # [E]
        mixture = torch.logsumexp(full[:, -1] + weights[:, None], dim=0)
        token = int(mixture.argmax())
        chosen.append(token)
        log_probs.append(float(mixture[token]))
        sequence.append(token)
    return chosen, log_probs


@pytest.mark.parametrize("mode", ["prefix", "updating"])
def test_kv_cached_mixture_equals_recomputation(mode: str) -> None:
    models = [tiny_llama(seed) for seed in range(3)]
    prompt = [1, 7, 22, 4, 30]
    prior = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    ours = generate_ids(live_ensemble(models, mode, prior), prompt, max_new_tokens=6)
    tokens, log_probs = recomputed_without_cache(models, prompt, 6, prior, mode)
    assert ours.token_ids == tokens
    assert ours.token_log_probs == pytest.approx(log_probs, abs=1e-5)
    assert sum(ours.posterior) == pytest.approx(1.0)


def test_sampling_is_seeded_and_respects_top_k() -> None:
    models = live_ensemble([tiny_llama(seed) for seed in range(2)])
    kwargs = {"max_new_tokens": 8, "greedy": False, "temperature": 1.5, "top_k": 1}
    greedy = generate_ids(models, [2, 3], max_new_tokens=8).token_ids
    assert generate_ids(models, [2, 3], seed=1, **kwargs).token_ids == greedy  # top-1 = greedy
    kwargs["top_k"] = None
    first = generate_ids(models, [2, 3], seed=5, **kwargs).token_ids
    assert generate_ids(models, [2, 3], seed=5, **kwargs).token_ids == first


def test_stops_at_eos() -> None:
    model = live_ensemble([tiny_llama(0)])
    first = generate_ids(model, [3, 4], max_new_tokens=5).token_ids
    stopped = generate_ids(model, [3, 4], max_new_tokens=5, eos_token_id=first[1]).token_ids
    assert stopped == first[: first.index(first[1]) + 1]
