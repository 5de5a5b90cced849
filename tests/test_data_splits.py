"""Document-level splits: deterministic, disjoint, exact for small corpora, streamable."""

from __future__ import annotations

import numpy as np
import pytest

from hdee.data.splits import (
    SPLIT_NAMES,
    assign_splits,
    hashed_splits,
    route_documents,
    split_counts,
)

DEFAULT = (0.8, 0.1, 0.1)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(3, (1, 1, 1)), (10, (8, 1, 1)), (100, (80, 10, 10)), (7, (5, 1, 1)), (1000, (800, 100, 100))],
)
def test_split_counts_exact_and_every_split_non_empty(n: int, expected: tuple[int, int, int]):
    assert split_counts(n, DEFAULT) == expected


def test_split_counts_zero_ratio_stays_empty_and_too_small_is_an_error():
    assert split_counts(5, (0.9, 0.1, 0.0)) == (4, 1, 0)
    assert split_counts(2, (0.9, 0.1, 0.0)) == (1, 1, 0)
    with pytest.raises(ValueError, match="need at least 3 documents"):
        split_counts(2, DEFAULT)


def test_assign_splits_is_deterministic_and_matches_counts():
    a = assign_splits(50, DEFAULT, seed=7)
    b = assign_splits(50, DEFAULT, seed=7)
    c = assign_splits(50, DEFAULT, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.bincount(a, minlength=3).tolist() == [40, 5, 5]


def test_hashed_splits_stable_proportional_and_respect_zero_ratio():
    idx = np.arange(100_000)
    a = hashed_splits(idx, DEFAULT, seed=3)
    assert np.array_equal(a, hashed_splits(idx, DEFAULT, seed=3))
    # Independent of how many documents follow: a prefix keeps its assignment.
    assert np.array_equal(a[:1000], hashed_splits(idx[:1000], DEFAULT, seed=3))
    fractions = np.bincount(a, minlength=3) / idx.size
    assert np.allclose(fractions, DEFAULT, atol=0.01)
    assert not np.array_equal(a, hashed_splits(idx, DEFAULT, seed=4))
    no_test = hashed_splits(idx, (0.5, 0.5, 0.0), seed=3)
    assert set(np.unique(no_test).tolist()) == {0, 1}


def _route(n: int, seed: int = 0, exact_max: int = 1000) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for split, item in route_documents(((None, i) for i in range(n)), DEFAULT, seed, exact_max):
        out[split].append(item)
    return out


@pytest.mark.parametrize("n", [3, 20, 999, 1500])
def test_route_documents_partitions_every_document_once(n: int):
    routed = _route(n)
    everything = sorted(routed["train"] + routed["validation"] + routed["test"])
    assert everything == list(range(n))
    assert all(routed[name] for name in SPLIT_NAMES)
    assert routed == _route(n)  # deterministic
    assert routed != _route(n, seed=1)


def test_route_documents_small_corpus_is_exact_large_is_hashed():
    small = _route(20)
    assert [len(small[s]) for s in SPLIT_NAMES] == [16, 2, 2]
    # Beyond exact_max the assignment is the hash of (seed, index): adding documents at the end
    # never moves an earlier one.
    big = _route(300, exact_max=100)
    bigger = _route(400, exact_max=100)
    for name in SPLIT_NAMES:
        assert [i for i in bigger[name] if i < 300] == big[name]


def test_route_documents_keeps_the_sources_own_splits():
    docs = [("test", "a"), (None, "b"), ("validation", "c"), (None, "d"), (None, "e")]
    routed = list(route_documents(docs, DEFAULT, seed=0))
    assert ("test", "a") in routed and ("validation", "c") in routed
    assert sorted(item for _, item in routed) == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="unknown split"):
        list(route_documents([("dev", "x")], DEFAULT, seed=0))


def test_hashed_routing_is_the_hash_of_each_index_across_blocks():
    n = 9000  # more than two of route_documents' blocks of hashed indices
    routed = _route(n, exact_max=10)
    expected = hashed_splits(np.arange(n), DEFAULT, seed=0)
    for code, name in enumerate(SPLIT_NAMES):
        assert routed[name] == np.flatnonzero(expected == code).tolist()
