"""Training batches from (seed, step, rank) and sequential evaluation windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hdee.data.loaders import eval_batches, eval_windows, num_windows, train_batch

SEQ = 8


@pytest.fixture
def tokens() -> np.ndarray:
    # Distinct values make every window identifiable by its first token.
    return np.arange(8 * 25 + 1, dtype=np.uint16)


def test_train_batch_shape_dtype_and_determinism(tokens: np.ndarray):
    a = train_batch(tokens, SEQ, 4, seed=1, step=3)
    assert a.shape == (4, SEQ + 1) and a.dtype == torch.long
    assert torch.equal(a, train_batch(tokens, SEQ, 4, seed=1, step=3))
    assert not torch.equal(a, train_batch(tokens, SEQ, 4, seed=2, step=3))
    assert not torch.equal(a, train_batch(tokens, SEQ, 4, seed=1, step=4))


def test_labels_are_inputs_shifted_by_one(tokens: np.ndarray):
    batch = train_batch(tokens, SEQ, 5, seed=0, step=0)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    assert torch.equal(labels, inputs + 1)  # the stream is 0, 1, 2, ...
    assert all(int(row[0]) % SEQ == 0 for row in batch)  # windows start at multiples of seq_len


def test_ranks_are_disjoint_and_cover_an_epoch(tokens: np.ndarray):
    count = num_windows(len(tokens), SEQ)
    assert count == 25
    world, batch = 2, 3
    seen: list[int] = []
    steps = count // (world * batch)
    for step in range(steps):
        for rank in range(world):
            rows = train_batch(tokens, SEQ, batch, seed=5, step=step, rank=rank, world_size=world)
            seen.extend(int(r[0]) // SEQ for r in rows)
    assert len(seen) == len(set(seen)) == steps * world * batch


def test_grad_accum_micro_steps_are_distinct_and_resume_exactly(tokens: np.ndarray):
    micro = [
        train_batch(tokens, SEQ, 2, seed=3, step=4, micro_step=m, grad_accum=3) for m in range(3)
    ]
    firsts = [int(r[0]) for b in micro for r in b]
    assert len(set(firsts)) == 6
    again = train_batch(tokens, SEQ, 2, seed=3, step=4, micro_step=1, grad_accum=3)
    assert torch.equal(again, micro[1])


def test_eval_windows_sequential_non_overlapping(tokens: np.ndarray):
    batches = list(eval_batches(tokens, SEQ, batch_size=4))
    rows = torch.cat(batches)
    assert rows.shape == (25, SEQ + 1)
    assert [int(r[0]) for r in rows] == [k * SEQ for k in range(25)]
    # Labels of consecutive windows tile the stream exactly once.
    labels = rows[:, 1:].reshape(-1)
    assert torch.equal(labels, torch.arange(1, 25 * SEQ + 1))
    assert all(
        torch.equal(a, b) for a, b in zip(batches, eval_batches(tokens, SEQ, 4), strict=True)
    )
    assert eval_windows(tokens, SEQ, max_windows=7) == 7
    assert sum(len(b) for b in eval_batches(tokens, SEQ, 4, max_windows=7)) == 7


def test_too_few_tokens_is_an_error():
    with pytest.raises(ValueError, match="fewer than one sequence"):
        train_batch(np.arange(SEQ, dtype=np.uint16), SEQ, 1, seed=0, step=0)
