"""Routed (sparse) ensembles: run only the experts a text needs (docs/evaluation.md, "Routing").

One mechanism, shared by evaluation, generation and the benchmark. For members j in M:

- every member runs on the first r tokens of a sequence (`route_tokens`); there the mixture is
  the dense one;
- at t = r the router keeps a set K from the prefix posterior w_j(r) = P(j | x_<r):
  `prefix`: the top k; `budget`: the set with the most posterior mass whose summed forward
  FLOPs per token fit a budget B (exact enumeration of the 2^E subsets); `prior`: the top k of
  the prior P(j) itself, with r = 0 (no routing cost);
- for t >= r, P(j | x_<t) is the dense posterior restricted to K and renormalised over it (zero
  elsewhere), still updated token by token; the kept experts continue from their KV caches of
  the prefix, the others never run again.

The cost of a sequence of T scored tokens is r * sum_{j in M} F_j + (T - r) * sum_{j in K} F_j,
with F_j = `hdee.shapes.forward_flops_per_token`; it is reported per scored token.

The selection math (`route`, `routed_log_weights`, `routed_mixture`, `routed_flops_per_token`)
is pure tensor arithmetic on label log-probs `[E, N, T]`, so `hdee evaluate` computes routed
perplexities exactly from its cache of every member's label log-probs (the kept experts'
log-probs at t >= r are the same numbers a routed run computes). `routed_label_log_probs` is
the routed *execution*: it really skips the forward passes of routed-away experts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from hdee.ensemble import POSTERIOR_MODES, PosteriorMode, posterior_weights
from hdee.records import Plan
from hdee.scoring import device_of, head_label_log_probs, inference_autocast

Routing = Literal["none", "prefix", "prior", "budget"]
ROUTINGS: tuple[str, ...] = ("none", "prefix", "prior", "budget")
Members = Literal["latest", "all"]
MAX_BUDGET_EXPERTS = 16  # 2^16 subsets: exact enumeration stays cheap


# ----------------------------------------------------------------------------------------------
# Members


def ensemble_members(
    plan: Plan, configuration: str, iteration: int | None = None, members: Members = "latest"
) -> tuple[int, dict[str, str]]:
    """(iteration, {member name: job id}) of a configuration after `iteration` (default: last).

    latest: the ensemble of that iteration, one expert per lane, named by its lane (as the
    rest of hdee names them). all: BTM's growing forest, every expert of every lane and
    iteration up to it, named `lane@k` (k: the iteration that trained it), iteration by
    iteration in the plan's lane order; a lane not retrained in an iteration adds nobody.
    """
    index, latest = plan.ensemble(configuration, iteration)
    if members == "latest":
        return index, latest
    if members != "all":
        raise ValueError(f"members must be 'latest' or 'all', got {members!r}")
    forest: dict[str, str] = {}
    seen: set[str] = set()
    for k in range(1, index + 1):
        for lane, job_id in plan.ensemble(configuration, k)[1].items():
            if job_id not in seen:
                seen.add(job_id)
                forest[f"{lane}@{k}"] = job_id
    return index, forest


# ----------------------------------------------------------------------------------------------
# Selection (pure)


def top_k_mask(log_weights: Tensor, k: int) -> Tensor:
    """Boolean mask `[..., E]` of the k largest weights along the last dimension (ties: the
    lower index, as `torch.topk` on CPU)."""
    experts = log_weights.shape[-1]
    if not 1 <= k <= experts:
        raise ValueError(f"experts (k) must be in 1..{experts} (the members), got {k}")
    index = torch.topk(log_weights, k, dim=-1).indices
    return torch.zeros_like(log_weights, dtype=torch.bool).scatter_(-1, index, True)


def feasible_subsets(flops: Sequence[float], budget: float) -> Tensor:
    """Every non-empty subset of experts whose summed FLOPs per token fit `budget`, as a
    boolean matrix `[S, E]` (exact enumeration; E <= 16)."""
    experts = len(flops)
    if experts > MAX_BUDGET_EXPERTS:
        raise ValueError(
            f"budget routing enumerates subsets exactly and supports at most "
            f"{MAX_BUDGET_EXPERTS} members, got {experts}"
        )
    subsets = torch.tensor(list(itertools.product([False, True], repeat=experts))[1:])
    cost = subsets.to(torch.float64) @ torch.as_tensor(flops, dtype=torch.float64)
    fits = subsets[cost <= budget]
    if fits.shape[0] == 0:
        raise ValueError(
            f"flop_budget {budget:.4g} FLOPs/token fits no expert: the cheapest member needs "
            f"{min(flops):.4g}"
        )
    return fits


def budget_mask(log_weights: Tensor, flops: Sequence[float], budget: float) -> Tensor:
    """`[N, E]`: per row, the feasible subset (`feasible_subsets`) with the highest posterior
    mass sum_{j in K} w_j; among equal masses the cheaper set."""
    subsets = feasible_subsets(flops, budget)  # [S, E]
    weights = torch.softmax(log_weights.to(torch.float64), dim=-1)  # [N, E]
    mass = weights @ subsets.to(torch.float64).T  # [N, S]
    cost = subsets.to(torch.float64) @ torch.as_tensor(flops, dtype=torch.float64)  # [S]
    # Rank by mass, then by lower cost: a tiny cost term never outweighs a real mass gap.
    score = mass - 1e-12 * cost / cost.max()
    return subsets[score.argmax(dim=1)]


def routing_log_posterior(
    lp: Tensor, log_prior: Tensor | None, mode: PosteriorMode, route_tokens: int
) -> Tensor:
    """log P(j | x_<r) per sequence, `[N, E]`: the posterior when predicting label r, from the
    label log-probs `lp[:, :, :r]` the prefix pass produced (`lp` may hold only those)."""
    if not 1 <= route_tokens <= lp.shape[2]:
        raise ValueError(f"route_tokens must be in 1..{lp.shape[2]}, got {route_tokens}")
    # A dummy column after the prefix: posterior_weights at that position uses labels < r.
    head = lp[:, :, :route_tokens].to(torch.float64)
    padded = torch.cat([head, torch.zeros_like(head[:, :, :1])], dim=2)
    return posterior_weights(padded, log_prior, mode)[:, :, -1].T


def route(
    lp: Tensor,
    log_prior: Tensor | None,
    mode: PosteriorMode,
    routing: Routing,
    route_tokens: int,
    experts: int | None = None,
    flops: Sequence[float] | None = None,
    flop_budget: float | None = None,
) -> tuple[Tensor, int]:
    """(kept `[E, N]` boolean, r): which experts each sequence keeps after routing, and at which
    position routing happened (0 for `prior` and `none`; `none` keeps everyone)."""
    num_experts, num_sequences = lp.shape[0], lp.shape[1]
    if routing == "none":
        return torch.ones(num_experts, num_sequences, dtype=torch.bool), 0
    if routing == "prior":
        if log_prior is None:
            raise ValueError("prior routing needs a prior (a uniform prior ranks no expert)")
        if experts is None:
            raise ValueError("prior routing needs experts (k)")
        prior = torch.as_tensor(log_prior, dtype=torch.float64)
        return top_k_mask(prior, experts)[:, None].expand(-1, num_sequences).clone(), 0
    if routing not in ("prefix", "budget"):
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    r = min(route_tokens, lp.shape[2])
    posterior = routing_log_posterior(lp, log_prior, mode, r)  # [N, E]
    if routing == "prefix":
        if experts is None:
            raise ValueError("prefix routing needs experts (k)")
        return top_k_mask(posterior, experts).T.contiguous(), r
    if flops is None or flop_budget is None:
        raise ValueError("budget routing needs each expert's FLOPs and a flop_budget")
    return budget_mask(posterior, flops, flop_budget).T.contiguous(), r


def routed_log_weights(
    lp: Tensor, log_prior: Tensor | None, mode: PosteriorMode, route_tokens: int, kept: Tensor
) -> Tensor:
    """log P(j | x_<t) `[E, N, T]` of a routed ensemble: the dense posterior before
    `route_tokens`, from there the dense posterior restricted to the kept experts (`kept`
    `[E, N]`) and renormalised over them (-inf elsewhere). Entries of `lp` for routed-away
    experts at t >= r are never read (a routed run does not compute them)."""
    lp64 = _only_what_ran(lp, route_tokens, kept)
    # Renormalising the dense posterior over K is the posterior of K alone: the normaliser
    # cancels, and a routed-away expert's (zeroed) evidence after r is masked away below.
    dense = posterior_weights(lp64, log_prior, mode)
    after = dense[:, :, route_tokens:].masked_fill(~kept[:, :, None], -math.inf)
    after = after - torch.logsumexp(after, dim=0, keepdim=True)
    return torch.cat([dense[:, :, :route_tokens], after], dim=2)


def _only_what_ran(lp: Tensor, route_tokens: int, kept: Tensor) -> Tensor:
    """`lp` in float64 with the entries a routed run never computes (routed-away experts at
    t >= r) set to 0, so nothing there (NaN, garbage) can leak into a normaliser."""
    lp64 = lp.to(torch.float64)
    after = lp64[:, :, route_tokens:].masked_fill(~kept[:, :, None], 0.0)
    return torch.cat([lp64[:, :, :route_tokens], after], dim=2)


def routed_mixture(
    lp: Tensor, log_prior: Tensor | None, mode: PosteriorMode, route_tokens: int, kept: Tensor
) -> Tensor:
    """log sum_j P(j | x_<t) p_j(x_t | x_<t) `[N, T]` (float64) under `routed_log_weights`."""
    weights = routed_log_weights(lp, log_prior, mode, route_tokens, kept)
    return torch.logsumexp(_only_what_ran(lp, route_tokens, kept) + weights, dim=0)


def routed_flops_per_token(
    flops: Sequence[float], kept: Tensor, route_tokens: int, tokens: int
) -> float:
    """Average forward FLOPs per scored token of sequences of `tokens` labels:
    (r * sum_M F_j + (T - r) * sum_{K_n} F_j) / T, averaged over sequences n."""
    f = torch.as_tensor(flops, dtype=torch.float64)
    prefix = route_tokens * f.sum()
    rest = (tokens - route_tokens) * (kept.to(torch.float64) * f[:, None]).sum(dim=0)  # [N]
    return float(((prefix + rest) / tokens).mean())


# ----------------------------------------------------------------------------------------------
# Routed execution


@dataclass
class RoutedScores:
    """What `routed_label_log_probs` computed for a batch."""

    log_probs: Tensor  # [B, T] float64: the routed mixture's log-prob of each label
    kept: Tensor  # [E, B] boolean: the experts each sequence kept after routing
    route_tokens: int  # r: positions every member ran on
    tokens_run: list[int]  # per expert: input tokens it ran a forward pass on


def _run(
    model: torch.nn.Module, inputs: Tensor, cache: object | None = None
) -> tuple[Tensor, object]:
    """The base model on `inputs` (continuing `cache`): (last hidden states, its new cache)."""
    out = model.model(input_ids=inputs, cache=cache, use_cache=True)
    return out.last_hidden_state, out.cache


@torch.inference_mode()
def routed_label_log_probs(
    models: Sequence[torch.nn.Module],
    batch: Tensor,
    routing: Routing = "prefix",
    route_tokens: int = 32,
    experts: int | None = None,
    log_prior: Tensor | None = None,
    mode: PosteriorMode = "prefix",
    flops: Sequence[float] | None = None,
    flop_budget: float | None = None,
) -> RoutedScores:
    """The routed ensemble's label log-probs of `batch` `[B, T + 1]` (inputs `batch[:, :-1]`,
    labels `batch[:, 1:]`), running only what routing keeps.

    Every member runs on the first r inputs with a KV cache; each row then keeps its set K
    (`route`), and each expert continues from its cache on the rows that kept it only: an expert
    no row kept runs no forward pass after routing. `prior` routing (r = 0) runs only the top k
    of the prior, on everything; `none` runs everyone on everything.
    """
    if not models:
        raise ValueError("need at least one expert")
    if mode not in POSTERIOR_MODES:
        raise ValueError(f"unknown posterior mode {mode!r}, expected one of {POSTERIOR_MODES}")
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"batch must be [B, T + 1] with T >= 1, got shape {tuple(batch.shape)}")
    device = device_of(models[0])
    batch = batch.to(device)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    rows, length = labels.shape
    num_experts = len(models)
    lp = torch.zeros(num_experts, rows, length, dtype=torch.float64)
    tokens_run = [0] * num_experts
    caches: list[object | None] = [None] * num_experts

    r = 0 if routing in ("none", "prior") else min(route_tokens, length)
    if r:
        for j, model in enumerate(models):
            with inference_autocast(device):
                hidden, caches[j] = _run(model, inputs[:, :r])
                lp[j, :, :r] = head_label_log_probs(model, hidden, labels[:, :r]).double().cpu()
            tokens_run[j] += rows * r
    kept, r_routed = route(lp, log_prior, mode, routing, r or length, experts, flops, flop_budget)
    assert r_routed == r
    if r < length:
        for j, model in enumerate(models):
            chosen = kept[j].nonzero().flatten()
            if chosen.numel() == 0:
                caches[j] = None  # routed away everywhere: never runs again
                continue
            cache = caches[j]
            if cache is not None and chosen.numel() < rows:
                cache.batch_select_indices(chosen.to(device))  # type: ignore[attr-defined]
            with inference_autocast(device):
                hidden, _ = _run(model, inputs[chosen.to(device), r:], cache)
                rest = head_label_log_probs(model, hidden, labels[chosen.to(device), r:])
            lp[j, chosen, r:] = rest.double().cpu()
            tokens_run[j] += int(chosen.numel()) * (length - r)
            caches[j] = None
    mixture = routed_mixture(lp, log_prior, mode, r, kept)
    return RoutedScores(log_probs=mixture, kept=kept, route_tokens=r, tokens_run=tokens_run)
