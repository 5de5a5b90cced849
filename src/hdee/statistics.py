"""Paired uncertainty of perplexity differences: a seeded paired bootstrap (pure numpy).

Two systems A (reference) and B (candidate) scored on the same n test windows, with per-window
summed label log-probabilities a_i, b_i and label counts c_i, differ by

    delta = (sum a - sum b) / sum c = log ppl_B - log ppl_A

(negative: the candidate has the lower perplexity). A paired bootstrap resamples *units* with
replacement, the same resample for both systems, and takes the percentiles of delta over the
resamples. Windows cut from one document are correlated, so the honest unit is the document
when the window-to-document map is known (`window_documents`); otherwise it is the window, and
the interval is then too narrow by however much neighbouring windows agree.

One resampling plan (`bootstrap_weights`) is drawn per domain and shared by every pair compared
on that domain, so all intervals of a domain come from the same resamples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Unit = Literal["documents", "windows"]
DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """delta = log ppl(candidate) - log ppl(reference) and its bootstrap percentile interval."""

    delta: float
    low: float
    high: float

    @property
    def verdict(self) -> Literal["candidate", "reference", "tie"]:
        """Which system is significantly better ('tie' when the interval contains zero)."""
        if self.high < 0:
            return "candidate"
        if self.low > 0:
            return "reference"
        return "tie"


def window_documents(tokens: np.ndarray, seq_len: int, count: int, eos_id: int) -> np.ndarray:
    """The document of each of the first `count` evaluation windows, `[count]` int64.

    Window k reads tokens `[k * seq_len, k * seq_len + seq_len]` (`data.loaders.eval_batches`);
    documents are separated by `eos_id`. A window belongs to the document of its first label
    (token `k * seq_len + 1`): the number of EOS tokens before that position. Windows that
    straddle a boundary are counted with the document they start in, which keeps every window
    in exactly one cluster.
    """
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    used = np.asarray(tokens[: count * seq_len + 1])
    eos_before = np.concatenate([[0], np.cumsum(used == eos_id)])  # EOS count before position p
    first_labels = np.arange(count, dtype=np.int64) * seq_len + 1
    return eos_before[first_labels].astype(np.int64)


def resampling_units(documents: np.ndarray | None, count: int) -> tuple[Unit, np.ndarray]:
    """(unit, cluster index of each window): documents where they are known and there are at
    least two of them (one cluster cannot be resampled), else every window its own unit."""
    if documents is not None and len(documents) == count:
        _, clusters = np.unique(documents, return_inverse=True)
        if clusters.max(initial=-1) >= 1:
            return "documents", clusters.astype(np.int64)
    return "windows", np.arange(count, dtype=np.int64)


def bootstrap_weights(
    clusters: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> np.ndarray:
    """How often each window is drawn in each resample, `[resamples, windows]` float64.

    Each resample draws as many clusters as there are, uniformly with replacement; a window
    counts as often as its cluster was drawn. Seeded, so the same inputs give the same plan.
    """
    if resamples <= 0:
        raise ValueError(f"resamples must be positive, got {resamples}")
    clusters = np.asarray(clusters, dtype=np.int64)
    if clusters.ndim != 1 or len(clusters) == 0:
        raise ValueError("need at least one window to resample")
    num_clusters = int(clusters.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(num_clusters, np.full(num_clusters, 1.0 / num_clusters), resamples)
    return draws[:, clusters].astype(np.float64)


def paired_interval(
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    level: float = DEFAULT_LEVEL,
) -> Interval:
    """delta and its percentile interval for per-window summed log-probs of two systems on the
    same windows, with the resampling plan `weights` from `bootstrap_weights`."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if not reference.shape == candidate.shape == labels.shape == weights.shape[1:]:
        raise ValueError(
            f"windows disagree: reference {reference.shape}, candidate {candidate.shape}, "
            f"labels {labels.shape}, resampling plan {weights.shape}"
        )
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    difference = reference - candidate
    delta = float(difference.sum() / labels.sum())
    resampled = (weights @ difference) / (weights @ labels)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Interval(delta=delta, low=float(low), high=float(high))
