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

Everything here is pure tensor arithmetic on label log-probs `[E, N, T]`, so `hdee evaluate`
computes routed perplexities exactly from its cache of every member's label log-probs (the
kept experts' log-probs at t >= r are the same numbers a routed run computes): `spec_mixture`
is one ensemble spec's mixture. The routed *execution*, which really skips the forward passes
of routed-away experts, is the live model (`hdee.hf_ensemble`, scored by
`hdee.inference.ensemble_label_log_probs`); the selection rules both use are
`hdee.selection`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from hdee.ensemble import mixture_log_probs, posterior_weights
from hdee.ensemble_spec import ROUTINGS, PosteriorMode, Routing
from hdee.selection import MAX_BUDGET_EXPERTS, budget_mask, feasible_subsets, top_k_mask

__all__ = [
    "MAX_BUDGET_EXPERTS",
    "ROUTINGS",
    "budget_mask",
    "cluster_mixture",
    "cluster_route",
    "feasible_subsets",
    "route",
    "routed_flops_per_token",
    "routed_log_weights",
    "routed_mixture",
    "routing_log_posterior",
    "spec_mixture",
    "top_k_mask",
]


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
    lp: Tensor,
    log_prior: Tensor | None,
    mode: PosteriorMode,
    route_tokens: int,
    kept: Tensor,
    log_prior_after: Tensor | None = None,
) -> Tensor:
    """log P(j | x_<t) `[E, N, T]` of a routed ensemble: the dense posterior before
    `route_tokens`, from there the dense posterior restricted to the kept experts (`kept`
    `[E, N]`) and renormalised over them (-inf elsewhere). Entries of `lp` for routed-away
    experts at t >= r are never read (a routed run does not compute them). `log_prior_after`
    (`[E, N]`, the cluster prior): the prior from r on (before r: `log_prior`)."""
    lp64 = _only_what_ran(lp, route_tokens, kept)
    # Renormalising the dense posterior over K is the posterior of K alone: the normaliser
    # cancels, and a routed-away expert's (zeroed) evidence after r is masked away below.
    dense = posterior_weights(lp64, log_prior, mode)
    if log_prior_after is not None:
        dense_after = posterior_weights(lp64, log_prior_after, mode)[:, :, route_tokens:]
    else:
        dense_after = dense[:, :, route_tokens:]
    after = dense_after.masked_fill(~kept[:, :, None], -math.inf)
    after = after - torch.logsumexp(after, dim=0, keepdim=True)
    return torch.cat([dense[:, :, :route_tokens], after], dim=2)


def _only_what_ran(lp: Tensor, route_tokens: int, kept: Tensor) -> Tensor:
    """`lp` in float64 with the entries a routed run never computes (routed-away experts at
    t >= r) set to 0, so nothing there (NaN, garbage) can leak into a normaliser."""
    lp64 = lp.to(torch.float64)
    after = lp64[:, :, route_tokens:].masked_fill(~kept[:, :, None], 0.0)
    return torch.cat([lp64[:, :, :route_tokens], after], dim=2)


def routed_mixture(
    lp: Tensor,
    log_prior: Tensor | None,
    mode: PosteriorMode,
    route_tokens: int,
    kept: Tensor,
    log_prior_after: Tensor | None = None,
) -> Tensor:
    """log sum_j P(j | x_<t) p_j(x_t | x_<t) `[N, T]` (float64) under `routed_log_weights`."""
    weights = routed_log_weights(lp, log_prior, mode, route_tokens, kept, log_prior_after)
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


def spec_mixture(
    lp: Tensor,
    log_prior: Tensor | None,
    mode: PosteriorMode,
    routing: Routing,
    route_tokens: int,
    experts: int | None = None,
    flops: Sequence[float] | None = None,
    flop_budget: float | None = None,
) -> tuple[Tensor, Tensor, int]:
    """(log-probs `[N, T]` float64, kept `[E, N]`, r) of one ensemble spec, from every member's
    label log-probs `lp` `[E, N, T]`: the cached counterpart of the live model
    (`hdee.hf_ensemble`), to which a test keeps it equal for every spec."""
    if routing == "none":
        kept = torch.ones(lp.shape[0], lp.shape[1], dtype=torch.bool)
        return mixture_log_probs(lp.to(torch.float64), log_prior, mode), kept, 0
    kept, r = route(lp, log_prior, mode, routing, route_tokens, experts, flops, flop_budget)
    return routed_mixture(lp, log_prior, mode, r, kept), kept, r


# ----------------------------------------------------------------------------------------------
# The cluster prior (prior: cluster; hdee.clusters.ClusterRouter computes it from the text)
#
# A sequence's cluster prior P_c(j | x_<r) comes from the text of its first r tokens, so it
# can weigh the experts only from position r on: before r every member runs with the uniform
# prior (the prefix is scored like any text, and no prediction may see its own label); from r
# the prior is the cluster prior, and the members it gives no mass (cluster_top_k) stop
# running. Routing prefix or budget then choose among those, by P_c(j) * P(x_<r | j).


def cluster_route(
    lp: Tensor,
    cluster_log_prior: Tensor,
    mode: PosteriorMode,
    routing: Routing,
    route_tokens: int,
    experts: int | None = None,
    flops: Sequence[float] | None = None,
    flop_budget: float | None = None,
) -> tuple[Tensor, int]:
    """(kept `[E, N]`, r) under the cluster prior `[E, N]` (log; -inf: outside the top k):
    none keeps every member with mass; prefix and budget choose among them."""
    r = min(route_tokens, lp.shape[2])
    reachable = torch.isfinite(cluster_log_prior)
    if routing == "none":
        return reachable.clone(), r
    if routing not in ("prefix", "budget"):
        raise ValueError(f"the cluster prior routes with none, prefix or budget, not {routing!r}")
    posterior = routing_log_posterior(lp, cluster_log_prior, mode, r)  # [N, E]
    if routing == "prefix":
        if experts is None:
            raise ValueError("prefix routing needs experts (k)")
        return top_k_mask(posterior, experts).T & reachable, r
    if flops is None or flop_budget is None:
        raise ValueError("budget routing needs each expert's FLOPs and a flop_budget")
    return budget_mask(posterior, flops, flop_budget).T & reachable, r


def cluster_mixture(
    lp: Tensor,
    cluster_log_prior: Tensor,
    mode: PosteriorMode,
    routing: Routing,
    route_tokens: int,
    experts: int | None = None,
    flops: Sequence[float] | None = None,
    flop_budget: float | None = None,
) -> tuple[Tensor, Tensor, int]:
    """(log-probs `[N, T]` float64, kept `[E, N]`, r) of a spec with the cluster prior, from
    every member's label log-probs `lp` `[E, N, T]` (the live model's counterpart)."""
    kept, r = cluster_route(
        lp, cluster_log_prior, mode, routing, route_tokens, experts, flops, flop_budget
    )
    return routed_mixture(lp, None, mode, r, kept, cluster_log_prior), kept, r
