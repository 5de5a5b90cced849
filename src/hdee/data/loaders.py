"""Batches for training and evaluation, read straight from memory-mapped token arrays.

Training batches are a pure function of (seed, step, micro-step, rank): a resumed job sees
exactly the batches it would have seen, and DDP ranks read disjoint windows. Evaluation uses
fixed, sequential, non-overlapping windows so every model is scored on the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len (each label is predicted once)."""
    return max(0, (num_tokens - 1) // seq_len)


def _check_enough(tokens: np.ndarray, seq_len: int) -> int:
    count = num_windows(len(tokens), seq_len)
    if count == 0:
        raise ValueError(
            f"only {len(tokens)} tokens, fewer than one sequence of seq_len + 1 = {seq_len + 1}"
        )
    return count


@lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def train_window_starts(
    count: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    step: int,
    micro_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
) -> np.ndarray:
    """Token offsets of the rows of one micro-batch (see docs/architecture.md)."""
    first = ((step * grad_accum + micro_step) * world_size + rank) * batch_size
    indices = np.arange(first, first + batch_size)
    starts = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(indices // count):
        in_epoch = indices // count == epoch
        starts[in_epoch] = _epoch_permutation(seed, int(epoch), count)[indices[in_epoch] % count]
    return starts * seq_len


def train_batch(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    step: int,
    micro_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
) -> torch.Tensor:
    """One micro-batch, LongTensor[batch_size, seq_len + 1]; inputs [:, :-1], labels [:, 1:]."""
    count = _check_enough(tokens, seq_len)
    starts = train_window_starts(
        count, seq_len, batch_size, seed, step, micro_step, rank, world_size, grad_accum
    )
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts])
    return torch.from_numpy(rows.astype(np.int64))


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> int:
    """How many evaluation windows `eval_batches` yields."""
    count = _check_enough(tokens, seq_len)
    return count if max_windows is None else min(count, max_windows)


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_windows: int | None = None,
) -> Iterator[torch.Tensor]:
    """Sequential non-overlapping windows: window k starts at token k * seq_len."""
    count = eval_windows(tokens, seq_len, max_windows)
    for first in range(0, count, batch_size):
        last = min(count, first + batch_size)
        span = np.asarray(tokens[first * seq_len : last * seq_len + 1]).astype(np.int64)
        # Rows overlap by one token (the last label of one is the first input of the next).
        rows = np.lib.stride_tricks.sliding_window_view(span, seq_len + 1)[::seq_len]
        # A copy: a one-row view would be read-only (and alias the memmap).
        yield torch.from_numpy(rows.copy())
