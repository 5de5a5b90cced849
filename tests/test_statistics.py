"""The paired bootstrap (hdee.statistics) on synthetic windows with a known difference."""

from __future__ import annotations

import numpy as np
import pytest

from hdee.statistics import (
    Interval,
    bootstrap_weights,
    paired_interval,
    resampling_units,
    window_documents,
)

WINDOWS, LABELS = 200, 64


def synthetic(shift: float, noise: float = 0.5, seed: int = 1) -> tuple[np.ndarray, ...]:
    """Per-window summed log-probs of a reference and a candidate whose per-label log-prob is
    higher by `shift` (so the true delta is -shift), with window-level noise shared by both
    (what pairing removes) and a little of each system's own."""
    rng = np.random.default_rng(seed)
    labels = np.full(WINDOWS, LABELS, dtype=np.float64)
    shared = rng.normal(-3.0, 1.0, WINDOWS) * LABELS  # windows differ a lot in difficulty
    reference = shared + rng.normal(0, noise, WINDOWS) * np.sqrt(LABELS)
    candidate = shared + shift * LABELS + rng.normal(0, noise, WINDOWS) * np.sqrt(LABELS)
    return reference, candidate, labels


def test_interval_covers_a_known_difference_and_excludes_zero_when_large() -> None:
    reference, candidate, labels = synthetic(shift=0.05)
    weights = bootstrap_weights(np.arange(WINDOWS), resamples=1000, seed=0)
    interval = paired_interval(reference, candidate, labels, weights)
    assert interval.low < -0.05 < interval.high
    assert interval.high < 0
    assert interval.verdict == "candidate"
    # Swapping the systems mirrors the interval.
    mirrored = paired_interval(candidate, reference, labels, weights)
    assert mirrored.delta == pytest.approx(-interval.delta)
    assert mirrored.verdict == "reference"


def test_interval_includes_zero_when_there_is_no_difference() -> None:
    reference, candidate, labels = synthetic(shift=0.0)
    weights = bootstrap_weights(np.arange(WINDOWS), resamples=1000, seed=0)
    interval = paired_interval(reference, candidate, labels, weights)
    assert interval.low < 0 < interval.high
    assert interval.verdict == "tie"


def test_pairing_matters_unpaired_noise_would_hide_the_difference() -> None:
    # The windows' shared difficulty (sd 64 nats per window) dwarfs the 3.2-nat gain; only a
    # paired resample (both systems on the same windows) sees it.
    reference, candidate, labels = synthetic(shift=0.05)
    weights = bootstrap_weights(np.arange(WINDOWS), resamples=500, seed=0)
    paired = paired_interval(reference, candidate, labels, weights)
    other = bootstrap_weights(np.arange(WINDOWS), resamples=500, seed=1)
    unpaired = (weights @ reference - other @ candidate) / (weights @ labels)
    assert paired.high - paired.low < 0.2 * (
        np.percentile(unpaired, 97.5) - np.percentile(unpaired, 2.5)
    )


def test_bootstrap_is_seeded_and_resamples_whole_documents() -> None:
    clusters = np.array([0, 0, 0, 1, 1, 2])
    first = bootstrap_weights(clusters, resamples=50, seed=3)
    assert np.array_equal(first, bootstrap_weights(clusters, resamples=50, seed=3))
    assert not np.array_equal(first, bootstrap_weights(clusters, resamples=50, seed=4))
    # Windows of one document are always drawn together, and each resample draws 3 documents.
    assert np.array_equal(first[:, 0], first[:, 1]) and np.array_equal(first[:, 0], first[:, 2])
    assert np.array_equal(first[:, 3], first[:, 4])
    assert np.all(first[:, [0, 3, 5]].sum(axis=1) == 3)


def test_document_clusters_widen_the_interval_of_correlated_windows() -> None:
    # 20 documents of 10 windows each; the candidate's gain varies by document only, so the
    # windows of a document are perfectly correlated: resampling windows is overconfident.
    rng = np.random.default_rng(0)
    documents = np.repeat(np.arange(20), 10)
    gain = rng.normal(0.02, 0.05, 20)[documents] * LABELS
    reference = rng.normal(-3, 1, len(documents)) * LABELS
    candidate = reference + gain
    labels = np.full(len(documents), LABELS, dtype=np.float64)
    unit, clusters = resampling_units(documents, len(documents))
    assert unit == "documents"
    by_document = paired_interval(reference, candidate, labels, bootstrap_weights(clusters))
    by_window = paired_interval(
        reference, candidate, labels, bootstrap_weights(np.arange(len(documents)))
    )
    assert by_document.high - by_document.low > 2 * (by_window.high - by_window.low)


def test_window_documents_follow_eos_tokens() -> None:
    eos = 0
    # seq_len 4: window k reads tokens [4k, 4k + 4]; its first label is token 4k + 1.
    tokens = np.array([5, 5, 0, 6, 6, 6, 6, 6, 0, 7, 7, 0, 8, 8, 8, 8, 8])
    assert window_documents(tokens, 4, 4, eos).tolist() == [0, 1, 2, 3]
    one_document = np.full(17, 9)
    assert window_documents(one_document, 4, 4, eos).tolist() == [0, 0, 0, 0]
    # One document cannot be resampled: the unit falls back to windows.
    unit, clusters = resampling_units(window_documents(one_document, 4, 4, eos), 4)
    assert unit == "windows" and clusters.tolist() == [0, 1, 2, 3]
    assert resampling_units(None, 3)[0] == "windows"


def test_bad_inputs_are_refused_with_the_reason() -> None:
    weights = bootstrap_weights(np.arange(3), resamples=10)
    with pytest.raises(ValueError, match="windows disagree"):
        paired_interval(np.zeros(3), np.zeros(4), np.ones(3), weights)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_weights(np.arange(3), resamples=0)
    assert Interval(0.1, 0.05, 0.2).verdict == "reference"


def test_window_documents_exactly():
    """Window k belongs to the document of its first label (token k * seq_len + 1): the EOS
    count before it, from document 0, int64; a first label that is an EOS ends its document."""
    eos = 0
    #          window 0: [5 6 0 7]  window 1: [7 0 8 9]  window 2: [9 9 0 0]  (seq_len 3)
    tokens = np.array([5, 6, 0, 7, 0, 8, 9, 9, 0, 0, 4])
    documents = window_documents(tokens, seq_len=3, count=3, eos_id=eos)
    assert documents.tolist() == [0, 1, 2] and documents.dtype == np.int64
    # Window 1's first label (token 4) is the EOS that ends document 1: it stays in it.
    assert window_documents(tokens, 3, 1, eos).tolist() == [0]
    empty = window_documents(tokens, 3, 0, eos)
    assert empty.shape == (0,) and empty.dtype == np.int64
    # seq_len 1: window k is token k and its label k + 1.
    assert window_documents(np.array([5, 0, 6, 0, 7]), 1, 4, eos).tolist() == [0, 1, 1, 2]


def test_resampling_units_exactly():
    unit, clusters = resampling_units(np.array([7, 7, 9]), 3)  # two documents are enough
    assert unit == "documents" and clusters.tolist() == [0, 0, 1] and clusters.dtype == np.int64
    unit, clusters = resampling_units(np.array([], dtype=np.int64), 0)
    assert unit == "windows" and clusters.shape == (0,)
    unit, clusters = resampling_units(None, 2)
    assert unit == "windows" and clusters.tolist() == [0, 1] and clusters.dtype == np.int64


def test_bootstrap_weights_take_what_they_document_and_refuse_the_rest():
    one = bootstrap_weights(np.array([0]), resamples=1)
    assert one.shape == (1, 1) and one.tolist() == [[1.0]]  # one window, one resample
    assert np.array_equal(
        bootstrap_weights(np.array([0, 1, 1])), bootstrap_weights([0, 1, 1], seed=0)
    )
    as_floats = bootstrap_weights(np.array([0.0, 1.0, 1.0]), resamples=5, seed=3)
    assert np.array_equal(as_floats, bootstrap_weights(np.array([0, 1, 1]), resamples=5, seed=3))
    for bad in (np.array([], dtype=np.int64), np.zeros((2, 2), dtype=np.int64)):
        with pytest.raises(ValueError, match="^need at least one window to resample$"):
            bootstrap_weights(bad)
    with pytest.raises(ValueError, match="resamples must be positive, got 0"):
        bootstrap_weights(np.array([0]), resamples=0)


def test_paired_interval_equals_a_hand_computation():
    # float32 sums whose differences float32 would round: the maths is float64 whatever comes.
    reference = np.array([-1000.1, -20.3, -5.7, -8.9], dtype=np.float32)
    candidate = np.array([-0.37, -21.53, -4.1, -7.251], dtype=np.float32)
    labels = np.array([4, 8, 2, 3])
    weights = bootstrap_weights(np.arange(4), resamples=50, seed=5)
    interval = paired_interval(reference, candidate, labels, weights, level=0.9)
    difference = reference.astype(np.float64) - candidate.astype(np.float64)
    assert interval.delta == pytest.approx(difference.sum() / labels.sum(), rel=1e-12)
    in_float32 = (reference - candidate).sum() / labels.sum()
    assert interval.delta != pytest.approx(in_float32, rel=1e-9), "the case cannot tell them apart"
    resampled = (weights @ difference) / (weights @ labels.astype(np.float64))
    low, high = np.percentile(resampled, [5.0, 95.0])
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-12)  # BLAS order
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"^level must be in \(0, 1\), got {level}$"):
            paired_interval(reference, candidate, labels, weights, level=level)
