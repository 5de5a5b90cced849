"""The fast, log-space ensembling functions against literal implementations of the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from hdee.ensemble import (
    estimate_cached_prior,
    mean_posterior,
    mixture_log_probs,
    perplexity,
    posterior_weights,
    simple_average,
)
from hdee.scoring import label_log_probs
from train_helpers import random_llama


def random_lp(experts: int, sequences: int, positions: int, seed: int) -> torch.Tensor:
    """Label log-probs of plausible size: log of random probabilities in (0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(experts, sequences, positions, generator=generator, dtype=torch.float64)
    return torch.log(probs.clamp_min(1e-3))


def literal_posterior(lp: torch.Tensor, prior: list[float], mode: str) -> list[list[list[float]]]:
    """P(j | x_<t) straight from docs/design.md, in probability space with Python loops."""
    experts, sequences, positions = lp.shape
    p = lp.exp().tolist()
    weights = [[[0.0] * positions for _ in range(sequences)] for _ in range(experts)]
    for n in range(sequences):
        for t in range(positions):
            unnormalised = []
            for j in range(experts):
                value = prior[j]
                if mode == "prefix":
                    for s in range(t):
                        value *= p[j][n][s]
                elif t > 0:
                    value *= p[j][n][t - 1]
                unnormalised.append(value)
            total = sum(unnormalised)
            for j in range(experts):
                weights[j][n][t] = unnormalised[j] / total
    return weights


def literal_mixture(lp: torch.Tensor, prior: list[float], mode: str) -> torch.Tensor:
    experts, sequences, positions = lp.shape
    p = lp.exp().tolist()
    weights = literal_posterior(lp, prior, mode)
    out = torch.empty(sequences, positions, dtype=torch.float64)
    for n in range(sequences):
        for t in range(positions):
            out[n, t] = math.log(sum(p[j][n][t] * weights[j][n][t] for j in range(experts)))
    return out


@pytest.mark.parametrize("mode", ["prefix", "updating"])
@pytest.mark.parametrize("experts", [1, 2, 3])
def test_mixture_matches_literal_formula(mode: str, experts: int) -> None:
    lp = random_lp(experts, 3, 12, seed=experts)
    prior = torch.softmax(torch.randn(experts, generator=torch.Generator().manual_seed(7)), 0)
    expected = literal_mixture(lp, prior.tolist(), mode)
    for dtype in (torch.float64, torch.float32):
        got = mixture_log_probs(lp.to(dtype), prior.log(), mode)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    weights = posterior_weights(lp, prior.log(), mode).exp()
    expected_weights = torch.tensor(
        literal_posterior(lp, prior.tolist(), mode), dtype=torch.float64
    )
    torch.testing.assert_close(weights, expected_weights, atol=1e-5, rtol=1e-5)


def test_uniform_prior_is_the_default() -> None:
    lp = random_lp(3, 2, 9, seed=1)
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64).log()
    torch.testing.assert_close(mixture_log_probs(lp), mixture_log_probs(lp, uniform))
    torch.testing.assert_close(mixture_log_probs(lp), literal_mixture(lp, [1 / 3] * 3, "prefix"))


def test_per_sequence_prior() -> None:
    lp = random_lp(2, 2, 5, seed=3)
    priors = torch.tensor([[0.9, 0.2], [0.1, 0.8]], dtype=torch.float64)  # [E, N]
    got = mixture_log_probs(lp, priors.log())
    for n in range(2):
        expected = literal_mixture(lp[:, n : n + 1], priors[:, n].tolist(), "prefix")
        torch.testing.assert_close(got[n : n + 1], expected, atol=1e-5, rtol=1e-5)


def test_long_sequences_stay_finite() -> None:
    # 2048 positions of log-probs around -5 underflow any product in probability space.
    lp = random_lp(3, 2, 2048, seed=4) * 5
    for mode in ("prefix", "updating"):
        weights = posterior_weights(lp.float(), None, mode)
        assert torch.isfinite(mixture_log_probs(lp.float(), None, mode)).all()
        torch.testing.assert_close(weights.exp().sum(0), torch.ones(2, 2048))


@pytest.mark.parametrize("mode", ["prefix", "updating"])
def test_one_expert_is_that_expert(mode: str) -> None:
    lp = random_lp(1, 4, 10, seed=5)
    torch.testing.assert_close(mixture_log_probs(lp, None, mode), lp[0])
    torch.testing.assert_close(simple_average(lp), lp[0])


@pytest.mark.parametrize("mode", ["prefix", "updating"])
def test_identical_experts_equal_each_one(mode: str) -> None:
    one = random_lp(1, 3, 10, seed=6)
    lp = one.expand(4, -1, -1).clone()
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64).log()
    torch.testing.assert_close(mixture_log_probs(lp, prior, mode), one[0])
    torch.testing.assert_close(simple_average(lp), one[0])


@pytest.mark.parametrize("mode", ["prefix", "updating"])
def test_posteriors_sum_to_one_and_start_at_prior(mode: str) -> None:
    lp = random_lp(3, 4, 15, seed=8)
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    weights = posterior_weights(lp, prior.log(), mode).exp()
    torch.testing.assert_close(weights.sum(0), torch.ones(4, 15, dtype=torch.float64))
    torch.testing.assert_close(weights[:, :, 0], prior[:, None].expand(3, 4))
    # An unnormalised prior means the same thing.
    torch.testing.assert_close(posterior_weights(lp, (prior * 7).log(), mode).exp(), weights)


def test_prefix_posterior_concentrates_on_the_better_expert() -> None:
    good = torch.full((1, 1, 50), math.log(0.5), dtype=torch.float64)
    bad = torch.full((1, 1, 50), math.log(0.1), dtype=torch.float64)
    weights = posterior_weights(torch.cat([good, bad]), None, "prefix").exp()
    assert weights[0, 0, -1] > 0.999
    assert weights[0, 0, 0] == pytest.approx(0.5)


def test_simple_average_is_a_real_mixture() -> None:
    lp = random_lp(3, 4, 20, seed=9)
    mixed = simple_average(lp)
    expected = lp.exp().mean(0).log()
    torch.testing.assert_close(mixed, expected)
    assert (mixed >= lp.min(0).values - 1e-12).all()
    assert (mixed <= lp.max(0).values + 1e-12).all()
    # Not the public reference's geometric mean: by Jensen it is strictly larger here.
    assert (mixed > lp.mean(0) + 1e-6).all()


def literal_cached_prior(sequence_ll: torch.Tensor, decay: float) -> list[float]:
    num_experts = sequence_ll.shape[1]
    pi = [1.0 / num_experts] * num_experts
    for row in sequence_ll.tolist():
        peak = max(row)
        unnormalised = [math.exp(v - peak) for v in row]
        posterior = [u / sum(unnormalised) for u in unnormalised]
        pi = [(1 - decay) * p + decay * q for p, q in zip(pi, posterior, strict=True)]
    return pi


@pytest.mark.parametrize("decay", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("count", [1, 7, 100])
def test_cached_prior_matches_literal_ewma(decay: float, count: int) -> None:
    generator = torch.Generator().manual_seed(count)
    # Sequence log-likelihoods are large negative numbers (hundreds of tokens).
    sequence_ll = -500 + 20 * torch.randn(count, 3, generator=generator, dtype=torch.float64)
    prior = estimate_cached_prior(sequence_ll, decay)
    torch.testing.assert_close(
        prior, torch.tensor(literal_cached_prior(sequence_ll, decay), dtype=torch.float64)
    )
    assert prior.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert prior.shape == (3,)


def test_cached_prior_favours_the_expert_that_explains_the_data() -> None:
    sequence_ll = torch.tensor([[-100.0, -120.0, -130.0]] * 20)
    prior = estimate_cached_prior(sequence_ll, 0.3)
    assert prior.argmax().item() == 0 and prior[0] > 0.99


def test_perplexity_and_mean_posterior() -> None:
    lp = torch.full((2, 3), math.log(0.25))
    assert perplexity(lp) == pytest.approx(4.0)
    weights = torch.tensor([[[0.2, 0.4]], [[0.8, 0.6]]]).log()
    torch.testing.assert_close(
        mean_posterior(weights), torch.tensor([0.3, 0.7], dtype=torch.float64)
    )


def tiny_llama(vocab: int = 97, seed: int = 0) -> LlamaForCausalLM:
    return random_llama(vocab, seed)


@pytest.mark.parametrize("chunk_size", [1, 7, 512])
def test_label_log_probs_matches_full_log_softmax(chunk_size: int) -> None:
    model = tiny_llama()
    batch = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(0))
    got = label_log_probs(model, batch, chunk_size=chunk_size)
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    expected = torch.log_softmax(logits.double(), -1).gather(-1, batch[:, 1:, None]).squeeze(-1)
    assert got.shape == (3, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 5, 16, 48, 1000])
def test_chunked_scorer_equals_full_softmax_at_a_large_vocabulary(chunk_size: int | None) -> None:
    """20000 tokens: the automatic chunk (16 positions) splits the 48 positions; 5 does not
    divide them; 1000 is larger than the batch."""
    model = random_llama(20_000, seed=3, sharpen=4.0)
    batch = torch.randint(0, 20_000, (3, 17), generator=torch.Generator().manual_seed(1))
    got = label_log_probs(model, batch, chunk_size=chunk_size)
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    expected = torch.log_softmax(logits.double(), -1).gather(-1, batch[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
