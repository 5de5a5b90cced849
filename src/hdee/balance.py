"""Balanced k-means, the maths (pure: numpy, scipy, scikit-learn; no files).

hdee.discover fits clusters with it: scikit-learn's k-means, then Lloyd steps whose assignment
is the cheapest one that keeps every cluster within a size band (`balanced_assignment`), and
assigns a corpus with the offsets that assignment's duals give, capped (`CappedChoice`).
docs/discovery.md states the guarantees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MAX_FIT_ITERATIONS = 30


def size_band(n: int, k: int, balance: float) -> tuple[int, int]:
    """The fewest and most of n documents a cluster may hold while fitting."""
    low = math.floor(n * (1 - balance) / k + 1e-9)
    high = math.ceil(n * (1 + balance) / k - 1e-9)
    return low, high


def balanced_assignment(
    distances: np.ndarray, low: int, high: int
) -> tuple[np.ndarray, np.ndarray]:
    """The assignment of n points to K clusters with the least total distance such that every
    cluster holds between `low` and `high` points, and the offsets that reproduce it.

    A transportation problem: its linear programme has an integral optimum (the constraint
    matrix is totally unimodular), which HiGHS's simplex returns. The duals of the size
    constraints are offsets lambda_j with point i in argmin_j (d_ij + lambda_j): the same rule
    then assigns documents that were not in the sample. scipy solves it; no library offers a
    size-constrained k-means step (c-BTM writes an auction algorithm by hand for equal sizes)."""
    from scipy import sparse
    from scipy.optimize import linprog

    n, k = distances.shape
    columns = np.arange(n * k)
    one_cluster_each = sparse.csr_matrix(
        (np.ones(n * k), (np.repeat(np.arange(n), k), columns)), shape=(n, n * k)
    )
    sizes = sparse.csr_matrix(
        (np.ones(n * k), (np.tile(np.arange(k), n), columns)), shape=(k, n * k)
    )
    result = linprog(
        distances.ravel(),
        A_ub=sparse.vstack([sizes, -sizes]).tocsr(),
        b_ub=np.concatenate([np.full(k, high), np.full(k, -low)]),
        A_eq=one_cluster_each,
        b_eq=np.ones(n),
        bounds=(0, 1),
        method="highs-ds",
    )
    if result.status != 0:
        raise RuntimeError(f"balanced assignment: the linear programme failed ({result.message})")
    assignment = result.x.reshape(n, k).argmax(axis=1)
    counts = np.bincount(assignment, minlength=k)
    if counts.min() < low or counts.max() > high:
        raise RuntimeError(f"balanced assignment: sizes {counts.tolist()} leave [{low}, {high}]")
    duals = result.ineqlin.marginals  # d(objective)/d(bound): <= 0 for binding constraints
    offsets = -duals[:k] + duals[k:]
    return assignment, offsets - offsets.mean()


@dataclass
class Fit:
    centroids: np.ndarray  # [K, D]
    offsets: np.ndarray  # [K]
    assignment: np.ndarray  # [n] the sample's clusters
    iterations: int
    converged: bool
    band: tuple[int, int]


def balanced_kmeans(features: np.ndarray, k: int, balance: float, seed: int) -> Fit:
    """k-means on squared Euclidean distance (scikit-learn's, from k-means++), then Lloyd
    steps whose assignment is balanced (`balanced_assignment`) until it stops changing."""
    from sklearn.cluster import KMeans

    n = len(features)
    band = size_band(n, k, balance)
    centroids = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(features).cluster_centers_
    previous: np.ndarray | None = None
    for iteration in range(1, MAX_FIT_ITERATIONS + 1):
        assignment, offsets = balanced_assignment(_distances(features, centroids), *band)
        converged = previous is not None and np.array_equal(assignment, previous)
        if converged or iteration == MAX_FIT_ITERATIONS:
            break
        previous = assignment
        centroids = np.stack(
            [
                features[assignment == j].mean(axis=0) if (assignment == j).any() else centroids[j]
                for j in range(k)
            ]
        )
    return Fit(centroids, offsets, assignment, iteration, converged, band)


def _distances(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[n, K] squared distances as |x|^2 + |c|^2 - 2 x.c: n x K memory, not n x K x D."""
    squared = (features**2).sum(1)[:, None] + (centroids**2).sum(1)[None, :]
    return np.maximum(squared - 2 * features @ centroids.T, 0.0)


class CappedChoice:
    """Each row's cheapest cluster among those not yet full: at most ceil((1 + balance) N / K)
    documents each (N: the corpus's documents, counted by the sampling pass)."""

    def __init__(self, clusters: int, documents: int, balance: float) -> None:
        self.cap = math.ceil(documents * (1 + balance) / clusters - 1e-9)
        self.counts = [0] * clusters
        self.moved = 0  # documents that went to another cluster than their cheapest

    def __call__(self, costs: torch.Tensor) -> list[int]:
        chosen = []
        for ranked in torch.argsort(costs, dim=1, stable=True).tolist():
            cluster = next((c for c in ranked if self.counts[c] < self.cap), ranked[0])
            self.counts[cluster] += 1
            self.moved += cluster != ranked[0]
            chosen.append(cluster)
        return chosen
