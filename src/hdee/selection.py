"""Which experts a sequence keeps when an ensemble routes: the top k, or the most posterior mass
within a FLOP budget. Pure tensor maths, torch only.

This file is shipped beside `modeling_hdee.py` in every `hdee export` directory (hf_ensemble.py
imports it relatively), so exported models route with exactly the rule `hdee evaluate` scores
(`hdee.routing` imports it too): it must import nothing but torch and the standard library.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_BUDGET_EXPERTS = 16  # 2^16 subsets: exact enumeration stays cheap


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
    subsets = feasible_subsets(flops, budget).to(log_weights.device)  # [S, E]
    weights = torch.softmax(log_weights.to(torch.float64), dim=-1)  # [N, E]
    mass = weights @ subsets.to(torch.float64).T  # [N, S]
    cost = subsets.to(torch.float64) @ torch.as_tensor(
        flops, dtype=torch.float64, device=log_weights.device
    )  # [S]
    # Rank by mass, then by lower cost: a tiny cost term never outweighs a real mass gap.
    score = mass - 1e-12 * cost / cost.max()
    return subsets[score.argmax(dim=1)]
