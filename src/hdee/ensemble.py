"""Domain-posterior ensembling of expert language models, on label log-probabilities only.

Everything the ensembling methods need is each expert's log-probability of each *label* token,
`lp[j, n, t] = log p_j(x_{t+1} | x_<=t)` for expert j, sequence n and position t: a tensor
`[E experts, N sequences, T positions]`. No method needs the full vocabulary distribution, so an
evaluator runs each expert once (`hdee.scoring.label_log_probs`), keeps `[N, T]` floats per
expert, and mixes afterwards.

The methods (see docs/design.md, "Ensembling with a domain posterior"):

    simple average:   p(x_t | x_<t) = 1/E * sum_j p_j(x_t | x_<t)
    domain posterior: p(x_t | x_<t) = sum_j p_j(x_t | x_<t) * P(j | x_<t)
        prefix (HDEE, default):    P(j | x_<t) ∝ P(j) * prod_{s<t} p_j(x_s | x_<s)
        updating (BTM/DEMix code): P(j | x_<t) ∝ P(j) * p_j(x_{t-1} | x_<t-1)   (prior at t=0)

All of it is computed in log space with log-sum-exp, so no product of probabilities underflows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from hdee.ensemble_spec import POSTERIOR_MODES, PosteriorMode

__all__ = ["POSTERIOR_MODES", "PosteriorMode"]  # re-exported: spelt once, in ensemble_spec


# ----------------------------------------------------------------------------------------------
# Mixing


def _as_log_prior(log_prior: Tensor | None, lp: Tensor) -> Tensor:
    """The log prior broadcast against `lp` `[E, N, T]`; None means uniform.

    A 1-D prior `[E]` is shared by all sequences; a 2-D prior `[E, N]` is one per sequence.
    """
    num_experts = lp.shape[0]
    if log_prior is None:
        return torch.full(
            (num_experts, 1, 1), -math.log(num_experts), dtype=lp.dtype, device=lp.device
        )
    log_prior = torch.as_tensor(log_prior, dtype=lp.dtype, device=lp.device)
    if log_prior.shape[0] != num_experts:
        raise ValueError(f"prior has {log_prior.shape[0]} entries for {num_experts} experts")
    # Normalise so callers may pass unnormalised log weights.
    log_prior = log_prior - torch.logsumexp(log_prior, dim=0, keepdim=True)
    return log_prior.reshape(log_prior.shape + (1,) * (lp.dim() - log_prior.dim()))


def _check(lp: Tensor) -> Tensor:
    if lp.dim() != 3:
        raise ValueError(f"label log-probs must be [experts, sequences, positions], got {lp.shape}")
    if lp.shape[0] == 0:
        raise ValueError("need at least one expert")
    # float64 inside: the prefix posterior sums up to thousands of log-probs per position, and
    # float32 cumulative sums would drift by more than the differences between experts.
    return lp.to(torch.float64)


def simple_average(lp: Tensor) -> Tensor:
    """log of the uniform mixture of the experts' probabilities, `[N, T]`.

    This is log(1/E * sum_j p_j), a real probability distribution; the public reference's
    mean of log-probabilities is a geometric mean that does not sum to one.
    """
    lp64 = _check(lp)
    return (torch.logsumexp(lp64, dim=0) - math.log(lp64.shape[0])).to(lp.dtype)


def posterior_weights(
    lp: Tensor, log_prior: Tensor | None = None, mode: PosteriorMode = "prefix"
) -> Tensor:
    """log P(j | x_<t) `[E, N, T]`: the weight of expert j when predicting label t.

    prefix:   log P(j) + sum_{s<t} lp[j, :, s], normalised over experts (at t = 0: the prior).
    updating: log P(j) + lp[j, :, t-1], normalised over experts (at t = 0: the prior).
    `log_prior` is `[E]` or `[E, N]` log-probabilities (None: uniform).
    """
    lp64 = _check(lp)
    log_prior64 = _as_log_prior(log_prior, lp64)
    if mode == "prefix":
        evidence = torch.cumsum(lp64, dim=-1)
    elif mode == "updating":
        evidence = lp64
    else:
        raise ValueError(f"unknown posterior mode {mode!r}, expected one of {POSTERIOR_MODES}")
    # Shift by one position: the weight for label t may only use labels before t.
    evidence = torch.nn.functional.pad(evidence[..., :-1], (1, 0), value=0.0)
    log_weights = log_prior64 + evidence
    log_weights = log_weights - torch.logsumexp(log_weights, dim=0, keepdim=True)
    return log_weights.to(lp.dtype)


def mixture_log_probs(
    lp: Tensor, log_prior: Tensor | None = None, mode: PosteriorMode = "prefix"
) -> Tensor:
    """log sum_j p_j(x_t | x_<t) P(j | x_<t), `[N, T]` (see `posterior_weights`)."""
    lp64 = _check(lp)
    log_weights = posterior_weights(lp64, log_prior, mode)
    return torch.logsumexp(lp64 + log_weights, dim=0).to(lp.dtype)


def estimate_cached_prior(sequence_log_likelihoods: Tensor, decay: float = 0.3) -> Tensor:
    """The BTM/DEMix "cached" domain prior, as probabilities `[E]` summing to one.

    `sequence_log_likelihoods[n, j]` is the total log-likelihood of (validation) sequence n
    under expert j. Each sequence's posterior under a uniform prior is
    `posterior_n = softmax_j(sequence_log_likelihoods[n])`, and the prior is their
    exponentially weighted moving average, starting from uniform:

        pi_0 = uniform;   pi_n = (1 - decay) * pi_{n-1} + decay * posterior_n

    Unrolled, `pi_N = (1-a)^N * uniform + sum_n a (1-a)^(N-n) posterior_n`: recent sequences
    weigh most, and with a = 0.3 the last ~10 sequences carry ~97% of the weight. Estimate it on
    validation sequences only: estimating it on the scored test sequences leaks labels.
    """
    if sequence_log_likelihoods.dim() != 2:
        raise ValueError("sequence_log_likelihoods must be [num_sequences, num_experts]")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    ll = sequence_log_likelihoods.to(torch.float64)
    count, num_experts = ll.shape
    posteriors = torch.softmax(ll, dim=1)  # [N, E]
    # Weight of sequence n (1-based) in pi_N is a * (1-a)^(N-n); of the uniform start, (1-a)^N.
    powers = torch.arange(count - 1, -1, -1, dtype=torch.float64)
    weights = decay * (1.0 - decay) ** powers
    prior = (1.0 - decay) ** count / num_experts + weights @ posteriors
    return prior / prior.sum()  # only rounding separates the sum from one


PriorUpdate = Literal["window", "last_token"]
PRIOR_UPDATES: tuple[str, ...] = ("window", "last_token")


def estimate_last_token_prior(last_label_log_probs: Tensor, decay: float = 0.3) -> Tensor:
    """The DEMix code's cached prior, as probabilities `[E]`.

    `last_label_log_probs[n, j]` is expert j's log-probability of the *last* label of
    (validation) window n. Each window contributes the one-token posterior there,
    `posterior_n = softmax_j(last_label_log_probs[n])` (what the "updating" weights would be
    after it), and the average starts from the first observation rather than from uniform:

        pi_1 = posterior_1;   pi_n = (1 - decay) * pi_{n-1} + decay * posterior_n
    """
    if last_label_log_probs.dim() != 2 or last_label_log_probs.shape[0] == 0:
        raise ValueError("last_label_log_probs must be [num_sequences >= 1, num_experts]")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    posteriors = torch.softmax(last_label_log_probs.to(torch.float64), dim=1)  # [N, E]
    count = posteriors.shape[0]
    # Unrolled: pi_N = (1-a)^(N-1) posterior_1 + sum_{n>=2} a (1-a)^(N-n) posterior_n.
    powers = torch.arange(count - 1, -1, -1, dtype=torch.float64)
    weights = decay * (1.0 - decay) ** powers
    weights[0] = (1.0 - decay) ** (count - 1)
    prior = weights @ posteriors
    return prior / prior.sum()


def cached_prior(validation_lp: Tensor, decay: float, update: PriorUpdate = "window") -> Tensor:
    """The cached prior `[E]` from validation label log-probs `[E, N, T]` (see
    `estimate_cached_prior` for 'window', `estimate_last_token_prior` for 'last_token')."""
    lp64 = _check(validation_lp)
    if update == "window":
        return estimate_cached_prior(lp64.sum(dim=2).T, decay)
    if update == "last_token":
        return estimate_last_token_prior(lp64[:, :, -1].T, decay)
    raise ValueError(f"unknown cached prior update {update!r}, expected one of {PRIOR_UPDATES}")


# ----------------------------------------------------------------------------------------------
# Summaries


def perplexity(log_probs: Tensor) -> float:
    """exp(- mean log-probability) over every label position given."""
    if log_probs.numel() == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return math.exp(-log_probs.to(torch.float64).mean().item())


def mean_posterior(log_weights: Tensor) -> Tensor:
    """The average weight of each expert over all positions, `[E]` (for the report's plot)."""
    return log_weights.to(torch.float64).exp().flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------
# The method table: every way `hdee evaluate` mixes an ensemble's label log-probs
#
# Config validation (`evaluation.methods`), `hdee evaluate`, the paired intervals
# (hdee.uncertainty) and the report read this table and nothing else: a method registered here
# is computed, compared and reported with no other change.


@dataclass(frozen=True)
class MixInputs:
    """What a method may read: the members' label log-probs on a domain's test windows
    `[E, N, T]` (and validation windows, for methods that estimate something there)."""

    test: Tensor
    validation: Tensor | None
    posterior: PosteriorMode
    cached_prior_decay: float
    cached_prior_update: PriorUpdate

    @classmethod
    def of(cls, test: Tensor, validation: Tensor | None, settings: Any) -> MixInputs:
        """With the posterior and cached-prior settings of an `EvaluationConfig`."""
        return cls(
            test,
            validation,
            settings.posterior,
            settings.cached_prior_decay,
            settings.cached_prior_update,
        )


@dataclass
class Mixed:
    """A method's output on one domain."""

    log_probs: Tensor  # [N, T]: the method's log-probability of every test label
    log_weights: Tensor | None = None  # [E, N, T]: P(j | x_<t), for methods with a posterior
    prior: Tensor | None = None  # [E] probabilities, for methods that estimate a prior
    member: int | None = None  # for methods that pick one member: its index


@dataclass(frozen=True)
class Method:
    name: str  # the key in evaluation.methods and results.json
    label: str  # how the report names it
    mix: Callable[[MixInputs], Mixed]
    needs_validation: bool = False  # reads validation windows (the evaluator scores them)
    uses_posterior: bool = False  # depends on evaluation.posterior (results.csv says which)
    uses_cached_prior: bool = False  # its prior follows evaluation.cached_prior_update


def _simple_average(inputs: MixInputs) -> Mixed:
    return Mixed(simple_average(inputs.test))


def _posterior(inputs: MixInputs, log_prior: Tensor | None) -> Mixed:
    weights = posterior_weights(inputs.test, log_prior, inputs.posterior)
    return Mixed(mixture_log_probs(inputs.test, log_prior, inputs.posterior), log_weights=weights)


def _uniform_prior(inputs: MixInputs) -> Mixed:
    return _posterior(inputs, None)


def _cached_prior(inputs: MixInputs) -> Mixed:
    assert inputs.validation is not None
    prior = cached_prior(inputs.validation, inputs.cached_prior_decay, inputs.cached_prior_update)
    mixed = _posterior(inputs, prior.log())
    mixed.prior = prior
    return mixed


def _best_single(inputs: MixInputs) -> Mixed:
    perplexities = [perplexity(inputs.test[j]) for j in range(inputs.test.shape[0])]
    best = min(range(len(perplexities)), key=lambda j: perplexities[j])
    return Mixed(inputs.test[best], member=best)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the table (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"an ensembling method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


register_method(
    Method("uniform_prior", "domain posterior, uniform prior", _uniform_prior, uses_posterior=True)
)
register_method(
    Method(
        "cached_prior",
        "domain posterior, cached prior",
        _cached_prior,
        needs_validation=True,
        uses_posterior=True,
        uses_cached_prior=True,
    )
)
register_method(Method("simple_average", "simple average of probabilities", _simple_average))
register_method(Method("best_single", "best single expert", _best_single))


def any_cached_prior_method(scored: Iterable[str]) -> bool:
    """Whether a method among `scored` uses the cached prior (the report names its rule)."""
    present = set(scored)
    return any(m.uses_cached_prior and m.name in present for m in METHODS.values())


def first_posterior_method(scored: Iterable[str]) -> str | None:
    """The first method of the table among `scored` that weighs the experts by a posterior:
    whose mean weights the report plots and assigns held-out domains to lanes by."""
    present = set(scored)
    return next((m.name for m in METHODS.values() if m.uses_posterior and m.name in present), None)


# `single_experts` is how configs named best_single before the table: the method scores every
# member alone and keeps the best (results.json has both, `single_experts` per member).
METHOD_ALIASES = {"single_experts": "best_single"}
