"""Domain discovery (hdee.discover, hdee.clusters): planted domains recovered, balanced sizes
within the stated band, determinism, the plain-file transform against scikit-learn's, the
cluster prior against float64 arithmetic, no pickle, bad input, and a discovered run through
`hdee run` to a finished evaluation and report.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from conftest import discovery_run_config
from hdee.balance import balanced_assignment, balanced_kmeans, size_band
from hdee.cli import main
from hdee.clusters import (
    ClusterTransform,
    cluster_log_prior,
    squared_distances,
    term_counts,
    tfidf_features,
    tokenize,
)
from hdee.config import ConfigError, DiscoverConfig, parse_config
from hdee.discover import tfidf_vectorizer
from hdee.layout import RunLayout


def hdee(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_info:
            code = int(exit_info.code or 0)
    return code, out.getvalue(), err.getvalue()


def write_config(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def planted_labels(layout: RunLayout, pool: Path) -> tuple[np.ndarray, np.ndarray]:
    """(cluster of every document, its planted topic), in corpus order (files sorted)."""
    assignment = load_file(str(layout.discovery_assignment))
    topics = [int(p.parent.name.removeprefix("topic")) for p in sorted(pool.rglob("*.txt"))]
    return assignment["cluster"], np.array(topics)


# ----------------------------------------------------------------------------------------------
# One discovery of planted domains through `hdee discover`, shared by the tests below


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`hdee discover` on 4 planted topics, one of them three times as large, with pickle
    loading made to fail for the whole command."""
    tmp_path = tmp_path_factory.mktemp("planted")
    raw = discovery_run_config(tmp_path, sizes=(120, 40, 40, 40), balance=0.25)
    config = write_config(tmp_path, raw)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("discovery loaded a pickle")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every test runs (conftest), so runs compare bit for bit
    with pytest.MonkeyPatch.context() as patch:
        for name in ("load", "loads"):
            patch.setattr(pickle, name, refuse)
        patch.setattr(pickle, "Unpickler", refuse)
        code, out, err = hdee("discover", str(config), "--quiet")
    torch.set_num_threads(threads)
    assert code == 0, err
    return {
        "config": config,
        "raw": raw,
        "layout": RunLayout.of(raw["run_dir"]),
        "out": out,
        "err": err,
        "pool": tmp_path / "pool",
    }


def test_planted_domains_are_recovered_and_recorded(planted_run: dict[str, Any]) -> None:
    from sklearn.metrics import adjusted_rand_score

    layout = planted_run["layout"]
    record = json.loads(layout.discovery_record.read_text())
    assert record["format"] == "hdee-discovery" and record["version"] == 1
    assert list(record["clusters"]) == ["cluster-00", "cluster-01", "cluster-02", "cluster-03"]
    clusters, topics = planted_labels(layout, planted_run["pool"])
    assert len(clusters) == record["documents"] == 240
    # The big topic must be cut (balance), the three others kept whole: compare with topics
    # where the big one counts as whatever its two halves are.
    assert record["agreement"]["labels"] == 4
    small = topics > 0
    assert adjusted_rand_score(topics[small], clusters[small]) >= 0.9
    assert record["agreement"]["adjusted_rand_index"] == pytest.approx(
        adjusted_rand_score(topics, clusters)
    )
    # Each cluster is prepared data like any domain's: manifests say what the record says.
    for name, cluster in record["clusters"].items():
        for split in ("train", "validation", "test"):
            manifest = json.loads(layout.manifest(name, split).read_text())
            assert manifest["num_documents"] == cluster["documents"][split] > 0
            assert manifest["num_tokens"] == cluster["tokens"][split] > 0
        assert len(cluster["top_terms"]) == 10
    # The command's result is on stdout: the table and the agreement line.
    assert "cluster-03" in planted_run["out"] and "ARI" in planted_run["out"]


def test_balanced_sizes_stay_within_the_stated_band(planted_run: dict[str, Any]) -> None:
    """Unbalanced planted topics (120 / 40 / 40 / 40): k-means alone would give one cluster
    half the corpus; with balance 0.25 every cluster holds 0.75 to 1.25 x an equal share of
    the sample, and at most 1.25 x an equal share of the corpus."""
    record = json.loads(planted_run["layout"].discovery_record.read_text())
    n = record["sample_documents"]
    low, high = size_band(n, 4, 0.25)
    assert record["sample_band"] == [low, high]
    sampled = [c["sample_documents"] for c in record["clusters"].values()]
    assert sum(sampled) == n and min(sampled) >= low and max(sampled) <= high
    assert max(sampled) < 0.5 * n  # the big topic did not take its natural half
    clusters, _ = planted_labels(planted_run["layout"], planted_run["pool"])
    sizes = np.bincount(clusters, minlength=4)
    assert np.abs(sizes / (len(clusters) / 4) - 1).max() == pytest.approx(record["corpus_spread"])
    assert record["corpus_cap"] == math.ceil(240 * 1.25 / 4) >= sizes.max()
    assert 0 <= record["capped_documents"] < 240


def test_size_band_and_balanced_assignment_are_exact() -> None:
    """The band's arithmetic, and the balanced assignment against brute force on small
    problems: it is the cheapest assignment within the band, and its offsets reproduce it."""
    assert size_band(100, 4, 0.0) == (25, 25)
    assert size_band(10, 3, 0.0) == (3, 4)
    assert size_band(100, 4, 0.2) == (20, 30)
    rng = np.random.default_rng(0)
    for n, k, balance in [(7, 2, 0.0), (8, 3, 0.3), (9, 3, 0.0), (8, 2, 0.5)]:
        distances = rng.random((n, k))
        low, high = size_band(n, k, balance)
        assignment, offsets = balanced_assignment(distances, low, high)
        best = min(
            sum(distances[i, c] for i, c in enumerate(choice))
            for choice in itertools.product(range(k), repeat=n)
            if all(low <= choice.count(j) <= high for j in range(k))
        )
        assert distances[np.arange(n), assignment].sum() == pytest.approx(best)
        counts = np.bincount(assignment, minlength=k)
        assert low <= counts.min() and counts.max() <= high
        # Points the offsets leave on a tie may go either way; every other point agrees.
        adjusted = distances + offsets
        margin = np.sort(adjusted, axis=1)[:, 1] - adjusted.min(axis=1)
        clear = margin > 1e-9
        assert (adjusted.argmin(axis=1)[clear] == assignment[clear]).all()


def test_the_corpus_cap_sends_a_full_clusters_documents_to_their_next_choice() -> None:
    from hdee.balance import CappedChoice

    choose = CappedChoice(clusters=3, documents=9, balance=0.0)  # at most 3 each
    costs = torch.tensor([[0.0, 1.0, 2.0]] * 5 + [[2.0, 0.0, 1.0]] * 4)
    assert choose(costs) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert choose.cap == 3 and choose.moved == 5


def test_balanced_kmeans_on_points_honours_every_tolerance() -> None:
    """Gaussian blobs of very different sizes: sizes within the band for each balance, and
    the same seed gives the same centroids."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 5)) * 4
    points = np.concatenate(
        [c + rng.normal(size=(m, 5)) for c, m in zip(centres, (200, 50, 30), strict=True)]
    )
    for balance in (0.0, 0.1, 0.5):
        fit = balanced_kmeans(points, 3, balance, seed=0)
        low, high = fit.band
        counts = np.bincount(fit.assignment, minlength=3)
        assert low <= counts.min() and counts.max() <= high, (balance, counts)
        again = balanced_kmeans(points, 3, balance, seed=0)
        assert np.array_equal(fit.centroids, again.centroids)
        assert np.array_equal(fit.assignment, again.assignment)


def test_the_same_seed_gives_the_same_clusters(planted_run: dict[str, Any], tmp_path: Path) -> None:
    raw = json.loads(json.dumps(planted_run["raw"]))
    raw["run_dir"] = str(tmp_path / "again")
    code, _, err = hdee("discover", str(write_config(tmp_path, raw)), "--quiet")
    assert code == 0, err
    first, again = planted_run["layout"], RunLayout.of(tmp_path / "again")
    assert first.discovery_assignment.read_bytes() == again.discovery_assignment.read_bytes()
    settings = [json.loads(layout.discovery_transform.read_text()) for layout in (first, again)]
    assert settings[0]["vocabulary"] == settings[1]["vocabulary"]
    assert settings[0]["fit"] == settings[1]["fit"]
    # The fit's floating point may differ in its last bits between processes (BLAS kernels
    # pick code paths by memory alignment); the clusters do not.
    arrays = [load_file(str(layout.discovery_arrays)) for layout in (first, again)]
    for name in arrays[0]:
        np.testing.assert_allclose(arrays[0][name], arrays[1][name], atol=1e-6)
    for name in json.loads(first.discovery_record.read_text())["clusters"]:
        assert first.tokens(name, "train").read_bytes() == again.tokens(name, "train").read_bytes()
    # Running it again does nothing new.
    before = again.discovery_record.stat().st_mtime_ns
    code, _, err = hdee("discover", str(write_config(tmp_path, raw)))
    assert code == 0 and "up to date, skipped" in err
    assert again.discovery_record.stat().st_mtime_ns == before


def test_no_pickle_is_written(planted_run: dict[str, Any]) -> None:
    """The planted run loaded no pickle (the fixture made loading one fail); nothing in the
    run directory is one: no pickle suffix, no file that starts with a pickle's opcode."""
    root = planted_run["layout"].root
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix not in (
            ".pkl",
            ".pickle",
            ".joblib",
            ".pt",
            ".bin",
        ) or path.parent.name.startswith(("cluster-", "general")), path
        head = path.read_bytes()[:2]
        assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), path


# ----------------------------------------------------------------------------------------------
# The plain-file transform and the cluster prior


TEXTS = [
    "The 3 quick brown foxes jumped over 42 lazy dogs in 1999.",
    "Über naïve café — déjà vu: façade ÉCOLE école 2nd 3rd",
    "and the of to",  # stop words only: no term of the vocabulary
    "dog dog dog dog fox",
    "Zebra zebras ZEBRA x y z 7",
    "",
]
FIT_TEXTS = [
    f"{animal} {verb} the {thing} number {n} {animal}s {extra}"
    for n, (animal, verb, thing, extra) in enumerate(
        itertools.product(
            ["dog", "fox", "zebra", "café"],
            ["jumped", "ran", "slept"],
            ["fence", "école", "river"],
            ["", "in 1999", "2nd day"],
        )
    )
]


def sklearn_and_stored() -> tuple[Any, Any, ClusterTransform]:
    """The fitted scikit-learn vectorizer and SVD, and the same transform as hdee stores it
    (vocabulary and idf as JSON would give them, components as float32)."""
    from sklearn.decomposition import TruncatedSVD

    vectorizer = tfidf_vectorizer(DiscoverConfig(corpus="general", clusters=3, min_df=1))
    svd = TruncatedSVD(n_components=5, random_state=0).fit(vectorizer.fit_transform(FIT_TEXTS))
    terms = json.loads(json.dumps(vectorizer.get_feature_names_out().tolist()))
    idf = json.loads(json.dumps(vectorizer.idf_.tolist()))
    centroids = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    stored = ClusterTransform(
        features="tfidf",
        names=["cluster-00", "cluster-01", "cluster-02"],
        vocabulary={t: i for i, t in enumerate(terms)},
        idf=torch.tensor(idf, dtype=torch.float64),
        components=torch.from_numpy(svd.components_.astype(np.float32)),
        mean=torch.zeros(0),
        centroids=centroids,
        offsets=torch.zeros(3),
        settings={},
    )
    return vectorizer, svd, stored


def test_the_stored_transform_equals_scikit_learns() -> None:
    from sklearn.metrics.pairwise import euclidean_distances
    from sklearn.preprocessing import normalize

    vectorizer, svd, stored = sklearn_and_stored()
    assert "#number" in stored.vocabulary and "the" not in stored.vocabulary
    texts = TEXTS + FIT_TEXTS[:5]
    for text in texts:
        assert term_counts(text) == __import__("collections").Counter(tokenize(text))
    expected = normalize(svd.transform(vectorizer.transform(texts)))
    got = tfidf_features(texts, stored)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-6)
    assert float(got[2].abs().sum()) == 0.0  # no vocabulary term: the zero vector, as sklearn
    distances = squared_distances(got, stored.centroids)
    reference = euclidean_distances(expected, stored.centroids.double().numpy(), squared=True)
    np.testing.assert_allclose(distances.numpy(), reference, atol=1e-5)


def test_cluster_log_prior_equals_a_float64_hand_computation() -> None:
    rng = np.random.default_rng(3)
    distances = rng.random((5, 6)) * 4
    for temperature, top_k in [(0.1, None), (1.0, None), (0.5, 2), (0.3, 6), (2.0, 1)]:
        got = cluster_log_prior(torch.tensor(distances), temperature, top_k).numpy()
        for row, d in zip(got, distances, strict=True):
            kept = range(6) if top_k is None else np.argsort(d, kind="stable")[:top_k]
            total = sum(math.exp(-d[j] / temperature) for j in kept)
            for j in range(6):
                expected = (
                    math.log(math.exp(-d[j] / temperature) / total) if j in kept else -math.inf
                )
                assert row[j] == pytest.approx(expected, abs=1e-12), (temperature, top_k, j)
    with pytest.raises(ValueError, match="temperature"):
        cluster_log_prior(torch.tensor(distances), 0.0)
    with pytest.raises(ValueError, match="top_k"):
        cluster_log_prior(torch.tensor(distances), 1.0, top_k=7)


def test_the_clusters_module_needs_no_hdee_and_no_sklearn() -> None:
    """hdee/clusters.py is meant to be copied into a torch-only model directory."""
    import ast

    import hdee.clusters

    tree = ast.parse(Path(hdee.clusters.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {
        "__future__",
        "json",
        "math",
        "re",
        "collections",
        "itertools",
        "dataclasses",
        "pathlib",
        "numpy",
        "torch",
        "safetensors",
    }, imported


def test_the_stored_files_assign_as_the_run_did(planted_run: dict[str, Any]) -> None:
    """Reading the run's transform.json + transform.safetensors with hdee.clusters alone
    assigns every document to the cluster the run did (but those the cap moved)."""
    from hdee.clusters import assign, cluster_distances, read_transform

    layout = planted_run["layout"]
    transform = read_transform(layout.discovery_transform, layout.discovery_arrays)
    clusters, _ = planted_labels(layout, planted_run["pool"])
    texts = [p.read_text() for p in sorted(planted_run["pool"].rglob("*.txt"))]
    chosen = assign(cluster_distances(texts, transform), transform.offsets).numpy()
    # Only documents the corpus cap moved off their nearest cluster may differ.
    capped = json.loads(layout.discovery_record.read_text())["capped_documents"]
    assert (chosen != clusters).sum() <= capped


def test_worker_processes_give_the_costs_this_process_gives(planted_run: dict[str, Any]) -> None:
    """A big corpus's tf-idf costs come from worker processes reading the stored files: the
    same numbers, in the same order, as computed here."""
    from hdee.clusters import read_transform
    from hdee.data.sources import Document
    from hdee.discover import CostStream, batched

    layout = planted_run["layout"]
    stored = (layout.discovery_transform, layout.discovery_arrays)
    transform = read_transform(*stored)
    docs = [
        ("train", Document(p.read_text(), None, str(p)))
        for p in sorted(planted_run["pool"].rglob("*.txt"))
    ]

    def costs(pool_min_chars: int) -> list[torch.Tensor]:
        featurise = lambda texts: tfidf_features(texts, transform)  # noqa: E731
        with CostStream(featurise, transform, stored, 1, pool_min_chars) as stream:
            result = list(stream(batched(docs, 16)))
            assert (stream.pool is not None) == (pool_min_chars == 0)
        assert [batch for batch, _ in result] == list(batched(docs, 16))
        return [c for _, c in result]

    here, there = costs(1 << 40), costs(0)
    assert all(torch.equal(a, b) for a, b in zip(here, there, strict=True))


# ----------------------------------------------------------------------------------------------
# Config and bad input


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    base = discovery_run_config(tmp_path)

    def error_of(change: dict[str, Any], data: dict[str, Any] | None = None) -> str:
        raw = json.loads(json.dumps(base))
        raw["data"]["discover"].update(change)
        raw["data"].update(data or {})
        with pytest.raises(ConfigError) as caught:
            parse_config(raw, "exp.yaml")
        return str(caught.value)

    assert "data.discover.clusters" in error_of({"clusters": 1})
    assert "data.discover.features" in error_of({"features": "bogus"})
    assert "data.discover.sample_documents" in error_of({"sample_documents": 3})
    assert "data.discover.balance" in error_of({"balance": 1.5})
    assert "data.discover.corpus" in error_of({"corpus": "nowhere"})
    assert "unknown key" in error_of({"cluster": 3})
    named = error_of(
        {}, {"domains": [{"name": "cluster-01", "source": {"type": "local", "paths": ["x"]}}]}
    )
    assert "cluster-01" in named and "rename" in named
    hub = error_of({"corpus": {"name": "web", "source": {"type": "hf", "path": "x/y"}}})
    assert "data.discover.labels" in hub
    config = parse_config(base)
    assert config.data.domain_names == ["cluster-00", "cluster-01", "cluster-02", "cluster-03"]
    assert config.trainable_domains == ["cluster-00", "cluster-01", "cluster-02"]
    general = parse_config(
        {**base, "data": {**base["data"], "discover": {"corpus": "general", "clusters": 5}}}
    )
    assert general.data.discover_corpus == general.data.general


def test_stage_order_puts_discovery_where_its_features_need_it(tmp_path: Path) -> None:
    from hdee.errors import UsageError
    from hdee.pipeline import select_stages

    tfidf = parse_config(discovery_run_config(tmp_path))
    seed = parse_config(discovery_run_config(tmp_path, features="seed"))
    assert select_stages(config=tfidf)[:3] == ["prepare", "discover", "seeds"]
    assert select_stages(config=seed)[:4] == ["prepare", "seeds", "discover", "difficulty"]
    assert select_stages("discover", "discover", tfidf) == ["discover"]
    assert "discover" not in select_stages()
    with pytest.raises(UsageError, match="needs data.discover"):  # a bad --from: exit 2
        select_stages("discover")


def _refused(tmp_path: Path, raw: dict[str, Any], *expected: str) -> str:
    code, _, err = hdee("discover", str(write_config(tmp_path, raw)), "--quiet")
    assert code == 2, err
    for text in expected:
        assert text in err, err
    layout = RunLayout.of(raw["run_dir"])
    assert not layout.discovery_record.exists()
    assert not list(layout.data.glob("cluster-*/*")), "cluster files were left behind"
    return err


def test_bad_corpora_are_refused_by_name_with_nothing_half_written(tmp_path: Path) -> None:
    # More clusters than training documents.
    raw = discovery_run_config(tmp_path / "few", clusters=8, sizes=(2, 2, 2))
    raw["plan"]["held_out"] = []
    _refused(tmp_path / "few", raw, "data.discover.clusters", "training document")
    # One document.
    raw = discovery_run_config(tmp_path / "one", clusters=3, sizes=(1,))
    raw["plan"]["held_out"] = []
    _refused(tmp_path / "one", raw, "data.discover.corpus", "'pool'", "1 document")
    # A cluster without test documents: 4 x 6 documents, a 20 / 2 / 2 split.
    raw = discovery_run_config(tmp_path / "small", clusters=4, sizes=(6, 6, 6, 6))
    err = _refused(tmp_path / "small", raw, "too small for its splits", "fewer clusters")
    assert "cluster 'cluster-0" in err
    assert "sample_documents is 10,000" in err  # the sample larger than the corpus, said
    # No term left after filtering: stop words only.
    raw = discovery_run_config(tmp_path / "stop", clusters=3, sizes=(30, 30, 30))
    raw["plan"]["held_out"] = []
    for path in (tmp_path / "stop" / "pool").rglob("*.txt"):
        path.write_text("the and of to in is it that was for on are with as " * 4)
    _refused(tmp_path / "stop", raw, "vocabulary is empty", "data.discover.min_df")


def test_a_record_from_another_version_is_refused_then_redone(
    planted_run: dict[str, Any], tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(planted_run["layout"].root, run)
    raw = json.loads(json.dumps(planted_run["raw"]))
    raw["run_dir"] = str(run)
    config = write_config(tmp_path, raw)
    layout = RunLayout.of(run)
    record = json.loads(layout.discovery_record.read_text())
    layout.discovery_record.write_text(json.dumps({**record, "version": 0}))
    # A stage that reads the clusters stops, naming the file and the command that redoes it.
    code, _, err = hdee(
        "run", str(config), "--from", "difficulty", "--until", "difficulty", "--quiet"
    )
    assert code != 0
    assert "discovery.json" in err and "version 0" in err and "hdee discover CONFIG" in err
    # The discover stage itself redoes it.
    code, _, err = hdee("discover", str(config))
    assert code == 0, err
    assert "discovering again" in err
    assert json.loads(layout.discovery_record.read_text())["version"] == 1
    assert (
        layout.discovery_assignment.read_bytes()
        == planted_run["layout"].discovery_assignment.read_bytes()
    )


# ----------------------------------------------------------------------------------------------
# A discovered run end to end


def test_a_discovered_run_trains_evaluates_and_reports(tmp_path: Path) -> None:
    """`hdee run` with data.discover, seed features (discovery after the seeds, in the seed's
    hidden states): the clusters go through difficulty, plan, experts, evaluation and the
    report exactly as configured domains do. One configuration (one seed, M), trained long
    enough (100 tiny steps) for its hidden states to tell the planted topics apart."""
    raw = discovery_run_config(tmp_path, features="seed")
    raw["seeds"]["training"]["steps"] = 100
    raw["plan"]["configurations"] = raw["plan"]["configurations"][:1]
    code, _, err = hdee("run", str(write_config(tmp_path, raw)), "--quiet")
    assert code == 0, err
    layout = RunLayout.of(raw["run_dir"])
    names = ["cluster-00", "cluster-01", "cluster-02", "cluster-03"]
    record = json.loads(layout.discovery_record.read_text())
    assert record["features"] == "seed" and record["seed_job"].startswith("seed-M-")
    assert record["agreement"]["adjusted_rand_index"] >= 0.9, record["agreement"]
    difficulty = json.loads(layout.difficulty_record.read_text())
    assert sorted(difficulty["perplexity"]) == names
    plan = json.loads(layout.plan.read_text())
    assert sorted(plan["trained_domains"]) == names[:3] and plan["held_out_domains"] == names[3:]
    results = json.loads(layout.results.read_text())
    assert sorted(results["domains"]) == names
    final = results["configurations"]["MHo-IHo"]["iterations"]["1"]["domains"]
    assert all(math.isfinite(final[n]["methods"]["uniform_prior"]["perplexity"]) for n in names)
    report = layout.report_markdown.read_text()
    section = report.split("## Discovered domains", 1)[1]
    assert all(name in section for name in names)
    assert "adjusted Rand index" in section and "held-out (" in section
    # Discovered domains carry their text's fingerprint like prepared ones.
    data = report.split("## Data", 1)[1]
    assert "Fingerprint of all corpora" in data and "`–`" not in data
