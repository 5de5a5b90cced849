"""Deterministic document-level train / validation / test splits.

A document's split depends only on (seed, its index in the corpus, the ratios, and whether the
corpus is small), never on a global random state, so `hdee prepare` is reproducible and no
document lands in two splits.

- Small corpora (at most `EXACT_SPLIT_MAX_DOCUMENTS` documents) use a seeded permutation with
  exact counts: every split with a non-zero ratio gets at least one document when possible.
- Larger corpora are split by a hash of (seed, index): it needs no count up front, so documents
  stream straight into their split with bounded memory; with more than a thousand documents an
  empty split is vanishingly unlikely (and would be reported by `prepare`).

Documents whose source already says which split they belong to (a dataset's own splits) keep it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

SPLIT_NAMES = ("train", "validation", "test")
EXACT_SPLIT_MAX_DOCUMENTS = 1000
_HASH_BLOCK = 4096

T = TypeVar("T")
Ratios = tuple[float, float, float]


def normalise(ratios: Iterable[float]) -> Ratios:
    values = tuple(float(r) for r in ratios)
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise ValueError(f"split ratios must be three non-negative numbers, got {values}")
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def split_counts(num_documents: int, ratios: Iterable[float]) -> tuple[int, int, int]:
    """Exact (train, validation, test) counts for a small corpus.

    Every split with a non-zero ratio gets at least one document; train takes the remainder.
    Raises ValueError when there are fewer documents than non-empty splits.
    """
    r = normalise(ratios)
    wanted = sum(1 for x in r if x > 0)
    if num_documents < wanted:
        raise ValueError(
            f"{num_documents} document(s) cannot fill {wanted} non-empty splits "
            f"(ratios train={r[0]:g}, validation={r[1]:g}, test={r[2]:g}); "
            f"need at least {wanted} documents"
        )
    held = [max(1, round(num_documents * x)) if x > 0 else 0 for x in r[1:]]
    # Rounding up small held-out splits must never starve train.
    while num_documents - sum(held) < 1:
        largest = int(np.argmax(held))
        held[largest] -= 1
    return (num_documents - sum(held), held[0], held[1])


def assign_splits(num_documents: int, ratios: Iterable[float], seed: int) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) of each of `num_documents` documents, from a
    seeded permutation with exact `split_counts`."""
    n_train, n_val, _ = split_counts(num_documents, ratios)
    order = np.random.default_rng([seed, num_documents]).permutation(num_documents)
    assignment = np.empty(num_documents, dtype=np.int8)
    assignment[order[:n_train]] = 0
    assignment[order[n_train : n_train + n_val]] = 1
    assignment[order[n_train + n_val :]] = 2
    return assignment


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (SplitMix64 finaliser), vectorised; wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK64


def hashed_splits(
    indices: np.ndarray | Iterable[int], ratios: Iterable[float], seed: int
) -> np.ndarray:
    """Split index of each document index from a hash of (seed, index): independent of how many
    documents there are, so it works on streams."""
    r = normalise(ratios)
    idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)
    with np.errstate(over="ignore"):
        keyed = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) ^ idx.astype(np.uint64)
    u = (_splitmix64(keyed) >> np.uint64(11)).astype(np.float64) / float(2**53)
    out = np.zeros(idx.shape, dtype=np.int8)
    out[u >= r[0]] = 1
    out[u >= r[0] + r[1]] = 2
    # A zero-ratio split must stay empty even under floating-point rounding at the boundary.
    if r[2] == 0:
        out[out == 2] = 1 if r[1] > 0 else 0
    if r[1] == 0:
        out[out == 1] = 0 if r[2] == 0 else 2
    return out


def route_documents(
    documents: Iterable[tuple[str | None, T]],
    ratios: Iterable[float],
    seed: int,
    exact_max: int = EXACT_SPLIT_MAX_DOCUMENTS,
) -> Iterator[tuple[str, T]]:
    """Give every document a split name.

    `documents` yields (own_split, item): own_split is a name from SPLIT_NAMES when the source
    decided it, else None. Untagged documents are numbered in order of arrival and split with
    `ratios` (exactly when there are at most `exact_max` of them, by hash otherwise). Untagged
    documents are held back only while the corpus may still turn out small, so memory stays
    bounded by `exact_max` documents.
    """
    r = normalise(ratios)
    pending: list[T] = []
    count = 0
    hashing = False
    # Hashed splits are computed a block of indices at a time: one numpy call per document
    # would cost more than reading it.
    block: list[int] = []
    block_start = 0
    for own, item in documents:
        if own is not None:
            if own not in SPLIT_NAMES:
                raise ValueError(f"unknown split {own!r}, expected one of {SPLIT_NAMES}")
            yield own, item
            continue
        if hashing:
            if count - block_start >= len(block):
                block_start = count
                block = hashed_splits(np.arange(count, count + _HASH_BLOCK), r, seed).tolist()
            yield SPLIT_NAMES[block[count - block_start]], item
            count += 1
            continue
        pending.append(item)
        if len(pending) > exact_max:
            hashing = True
            codes = hashed_splits(np.arange(len(pending)), r, seed)
            for code, held in zip(codes, pending, strict=True):
                yield SPLIT_NAMES[int(code)], held
            count = len(pending)
            pending = []
    if pending:
        codes = assign_splits(len(pending), r, seed)
        for code, held in zip(codes, pending, strict=True):
            yield SPLIT_NAMES[int(code)], held
