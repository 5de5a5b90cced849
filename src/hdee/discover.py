"""`hdee discover`: domains from one unlabelled corpus (c-BTM's clustering; docs/discovery.md).

    sample  -> a seeded reservoir sample of `sample_documents` training documents
    fit     -> tf-idf (sublinear tf) -> TruncatedSVD -> L2 norm, or a seed's mean hidden state;
               k-means (scikit-learn) refined with a balanced assignment
    assign  -> every document of the corpus, a batch at a time, to its cluster; tokenized
               straight into RUN/data/cluster-NN/<split>.bin like any domain's

The corpus is split by document exactly as `hdee prepare` splits any corpus (hdee.data.splits),
before clustering: a cluster's train / validation / test documents are the corpus's train /
validation / test documents that fell into it. So the clusterer is fitted on training documents
only, the BPE learns from the same training split, and, when the clustered corpus is the
general one, no cluster's test document was ever seen by a seed.

Balance (data.discover.balance = b), two guarantees:
- while fitting, every cluster holds between floor((1 - b) n / K) and ceil((1 + b) n / K) of
  the n sampled documents, exactly: each Lloyd step's assignment is the cheapest one within
  those sizes (a transportation problem, solved as a linear programme by scipy's HiGHS), and
  the duals of its size constraints are per-cluster offsets;
- in the corpus, no cluster holds more than ceil((1 + b) N / K) of its N documents: each
  document goes to argmin_j (||x - c_j||^2 + offset_j) among the clusters not yet full. The
  offsets keep the sample's proportions for documents like the sample's; where a topic larger
  than its share had to be cut, the cut is arbitrary and unseen documents of that topic may
  lean to one side, and the cap catches them (discovery.json counts the documents it moved).
  No lower bound holds for the corpus: a cluster can end smaller than the sample's band.

What is stored is plain files (hdee.clusters reads them with torch and numpy alone): the vocabulary and
idf in transform.json, the SVD components, centroids and offsets in transform.safetensors,
each document's cluster and split in assignment.safetensors, and discovery.json (the record:
sizes, top terms, agreement with labels) written last. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import re
import shutil
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from hdee.atomic import atomic_path, write_json
from hdee.balance import CappedChoice, balanced_kmeans
from hdee.clusters import (
    NUMBER_TOKEN,
    TOKEN_PATTERN,
    TRANSFORM_FORMAT,
    TRANSFORM_VERSION,
    ClusterTransform,
    centred_unit,
    mean_pool,
    read_transform,
    squared_distances,
    tfidf_features,
    tokenize,
)
from hdee.config import ConfigError, Corpus, DiscoverConfig, ExperimentConfig, stable_hash
from hdee.console import print_table, status, warn
from hdee.data import DataError, DiscoveryError
from hdee.data.packing import BATCH_CHARS, POOL_MIN_CHARS, Encoder, batch_by_key, resolve_workers
from hdee.data.prepare import counting, ratios_of, split_seed
from hdee.data.sources import Document, describe_source, iter_documents, source_state
from hdee.data.splits import SPLIT_NAMES, normalise, route_documents
from hdee.data.tokenizer import read_info
from hdee.data.tokens import TokenWriter, load_tokens, manifest_path, read_manifest, token_dtype
from hdee.layout import RunLayout
from hdee.records import ClusterSummary, DiscoveryRecord, LabelAgreement, RecordError

# Bump when a change here changes the clusters or the files discovery writes.
DISCOVER_VERSION = 1
TOP_TERMS = 10
# While the assignment pass tokenizes, each (cluster, split) holds an open batch of text: keep
# all of them together near this many characters, whatever K is.
OPEN_BATCH_CHARS = 16 << 20
_CLUSTER_DIRECTORY = re.compile(r"cluster-\d{2,}")


# ----------------------------------------------------------------------------------------------
# The corpus, split by document before anything else


def clustered_corpus(config: ExperimentConfig) -> tuple[Corpus, DiscoverConfig]:
    corpus, discover = config.data.discover_corpus, config.data.discover
    if corpus is None or discover is None:
        raise ConfigError("data.discover is not set: there is nothing to discover")
    return corpus, discover


def routed(config: ExperimentConfig) -> Iterator[tuple[str, Document]]:
    """(split, document) of every document of the corpus to cluster, in corpus order, split as
    `hdee prepare` splits any corpus (the same seed, so the BPE saw the same training split)."""
    corpus, discover = clustered_corpus(config)
    ratios = normalise(ratios_of(corpus, config))
    documents = ((doc.split, doc) for doc in iter_documents(corpus))
    try:
        yield from route_documents(documents, ratios, split_seed(config.seed, corpus))
    except DataError:
        raise
    except ValueError as error:  # fewer documents than splits
        raise DiscoveryError(
            f"data.discover.corpus {corpus.name!r} ({describe_source(corpus)}): {error}; "
            f"{discover.clusters} clusters need at least one training, validation and test "
            "document each (data.discover.clusters)"
        ) from None


def document_label(doc: Document, how: str) -> str:
    """A document's known label (data.discover.labels): its file's directory or file name."""
    path = Path(doc.origin)
    return path.parent.name if how == "directory" else path.name


@dataclass
class Sample:
    texts: list[str]  # the sampled training documents, in corpus order
    documents: int  # documents in the whole corpus
    training_documents: int


def draw_sample(config: ExperimentConfig, progress: bool) -> Sample:
    """A uniform sample of the corpus's training documents (reservoir sampling, seeded), in one
    streamed pass: at most `sample_documents` texts are ever held."""
    corpus, discover = clustered_corpus(config)
    size = discover.sample_documents
    rng = np.random.default_rng([config.seed, 0xD15C0])
    kept: list[tuple[int, str]] = []
    draws = np.zeros(0)
    total = seen = 0
    with counting(f"{corpus.name}: sampling", progress) as count:
        for split, doc in routed(config):
            count(doc.text)
            total += 1
            if split != "train":
                continue
            if seen < size:
                kept.append((total - 1, doc.text))
            else:
                if seen % 4096 == 0 or len(draws) == 0:
                    draws = rng.random(4096)  # one draw per document: Algorithm R
                slot = int(draws[seen % 4096] * (seen + 1))
                if slot < size:
                    kept[slot] = (total - 1, doc.text)
            seen += 1
    if seen < discover.clusters:
        raise DiscoveryError(
            f"data.discover.clusters: {discover.clusters} clusters for the {seen} training "
            f"document(s) of corpus {corpus.name!r} ({describe_source(corpus)}); expected at "
            "most one cluster per training document: lower data.discover.clusters or add "
            "documents (a big file can be cut with the source's split_documents)"
        )
    if seen < size:
        warn(
            f"data.discover.sample_documents is {size:,}, but corpus {corpus.name!r} has "
            f"{seen:,} training documents: fitting on all of them"
        )
    kept.sort()
    return Sample([text for _, text in kept], total, seen)


# ----------------------------------------------------------------------------------------------
# Fitting: features (then hdee.balance's balanced k-means)


def tfidf_vectorizer(discover: DiscoverConfig) -> Any:
    """scikit-learn's TfidfVectorizer as hdee fits it; hdee.clusters.tfidf_features applies the
    fitted one without scikit-learn."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(
        tokenizer=tokenize,  # lowercases; numbers become one token (c-BTM)
        token_pattern=None,
        lowercase=False,
        stop_words="english",
        sublinear_tf=True,
        min_df=discover.min_df,
        max_features=discover.max_features,
        dtype=np.float64,
    )


def fit_tfidf(
    texts: list[str], discover: DiscoverConfig, corpus: Corpus, seed: int
) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """(transform.json's vocabulary and idf, the SVD components, the sample's features)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.preprocessing import normalize

    vectorizer = tfidf_vectorizer(discover)
    try:
        tfidf = vectorizer.fit_transform(texts)
    except ValueError as error:  # "empty vocabulary" / "After pruning, no terms remain"
        raise DiscoveryError(
            f"data.discover.corpus {corpus.name!r}: the tf-idf vocabulary is empty after "
            f"filtering ({error}): no term of two or more letters outside English stop words "
            f"occurs in data.discover.min_df={discover.min_df} of the {len(texts)} sampled "
            "documents; lower data.discover.min_df or check the corpus's text"
        ) from None
    terms = vectorizer.get_feature_names_out().tolist()
    dims = min(discover.svd_dims, len(terms) - 1, len(texts) - 1)
    if dims < 1:
        raise DiscoveryError(
            f"data.discover.corpus {corpus.name!r}: {len(terms)} term(s) in the tf-idf "
            "vocabulary leave nothing to reduce; lower data.discover.min_df or add documents"
        )
    if dims < discover.svd_dims:
        warn(
            f"data.discover.svd_dims {discover.svd_dims} > what {len(terms)} terms and "
            f"{len(texts)} documents allow: using {dims}"
        )
    svd = TruncatedSVD(n_components=dims, algorithm="randomized", random_state=seed)
    features = normalize(svd.fit_transform(tfidf))
    settings = {"vocabulary": terms, "idf": vectorizer.idf_.tolist()}
    return settings, {"components": svd.components_.astype(np.float32)}, features


# ----------------------------------------------------------------------------------------------
# Seed features


class SeedFeatures:
    """Mean-pooled last hidden states of a seed model over a document's first `max_tokens`
    tokens (the prepared tokenizer's ids, as the seed was trained on), read in windows of the
    seed's sequence length: each window is one row of a batch, and a document's pooled state
    is the mean over all its windows' tokens."""

    def __init__(
        self, seed_dir: Path, tokenizer_dir: Path, max_tokens: int, window: int, device: str
    ) -> None:
        from hdee.data.tokenizer import load_tokenizer
        from hdee.scoring import load_expert, resolve_device

        self.device = resolve_device(device)
        self.model = load_expert(seed_dir, self.device)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.max_tokens = max_tokens
        self.window = window

    @torch.inference_mode()
    def pooled(self, texts: list[str], batch_rows: int = 32) -> torch.Tensor:
        from hdee.scoring import inference_autocast

        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        windows = [
            (doc, row[start : start + self.window])
            for doc, full in enumerate(ids)
            for row in [full[: self.max_tokens] or [self.tokenizer.eos_token_id]]
            for start in range(0, len(row), self.window)
        ]
        sums = torch.zeros(len(texts), self.model.config.hidden_size, dtype=torch.float64)
        counts = torch.zeros(len(texts), dtype=torch.float64)
        for start in range(0, len(windows), batch_rows):
            batch = windows[start : start + batch_rows]
            width = max(len(row) for _, row in batch)
            inputs = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, (_, row) in enumerate(batch):
                inputs[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            with inference_autocast(self.device):
                hidden = self.model.model(
                    input_ids=inputs.to(self.device),
                    attention_mask=mask.to(self.device),
                    use_cache=False,
                ).last_hidden_state
            tokens = mask.sum(1).to(torch.float64)
            documents = torch.tensor([doc for doc, _ in batch])
            # Each window's mean, weighted back by its tokens: a sum over the document.
            means = mean_pool(hidden.float().cpu(), mask).to(torch.float64)
            sums.index_add_(0, documents, means * tokens[:, None])
            counts.index_add_(0, documents, tokens)
        return (sums / counts.clamp(min=1)[:, None]).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# The stage


def discovery_fingerprint(
    config: ExperimentConfig, layout: RunLayout, seed_weights: str | None
) -> tuple[str, str]:
    """(what the fitted transform depends on, what the clusters' token files depend on)."""
    corpus, discover = clustered_corpus(config)
    fit = stable_hash(
        {
            "version": DISCOVER_VERSION,
            "settings": discover.model_dump(mode="json", exclude={"labels", "batch_documents"}),
            "source": source_state(corpus),
            "ratios": normalise(ratios_of(corpus, config)),
            "seed": config.seed,
            "seed_weights": seed_weights,
        }
    )
    info = read_info(layout.tokenizer)
    if info is None:
        raise RecordError(
            f"{layout.tokenizer}: no prepared tokenizer: run the 'prepare' stage first"
        )
    data = stable_hash({"fit": fit, "tokenizer": info["tokenizer_id"], "labels": discover.labels})
    return fit, data


def discover_domains(
    config: ExperimentConfig,
    layout: RunLayout,
    seed_dir: Path | None = None,
    seed_job: str | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> DiscoveryRecord:
    """Discover (or reuse) the clusters of data.discover and prepare them as domains."""
    corpus, discover = clustered_corpus(config)
    if discover.features == "seed" and seed_dir is None:
        raise ConfigError(
            "data.discover.features 'seed' needs a trained seed: run the 'seeds' stage first"
        )
    seed_weights = None
    if seed_dir is not None:
        from hdee.integrity import checked_weights_sha256

        seed_weights = checked_weights_sha256(seed_dir)
    fit_fingerprint, fingerprint = discovery_fingerprint(config, layout, seed_weights)
    current = _up_to_date(layout, discover, fingerprint)
    if current is not None:
        status(f"{corpus.name}: clusters up to date, skipped", console)
        return current

    # numpy / scipy's BLAS threads follow torch's (one setting for the process): on a busy
    # machine their own default, every core, spin-waits longer than small fits compute.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=torch.get_num_threads()):
        record = _discover(
            config, layout, seed_dir, seed_job, progress, console, fingerprint, fit_fingerprint
        )
    record.write(layout.discovery_record)
    return record


def _discover(
    config: ExperimentConfig,
    layout: RunLayout,
    seed_dir: Path | None,
    seed_job: str | None,
    progress: bool,
    console: Console | None,
    fingerprint: str,
    fit_fingerprint: str,
) -> DiscoveryRecord:
    corpus, discover = clustered_corpus(config)
    started = time.time()
    featurise: Callable[[list[str]], torch.Tensor]
    transform = _stored_transform(layout, fit_fingerprint)
    seeds = None
    if seed_dir is not None:
        device = config.seeds.training.device
        seeds = SeedFeatures(
            seed_dir, layout.tokenizer, discover.seed_tokens, config.data.seq_len, device
        )
    if transform is None:
        sample = draw_sample(config, progress)
        sampled = time.time()
        transform = _fit(config, layout, sample, seeds, fit_fingerprint, seed_job, console)
        timings = {"sample": sampled - started, "fit": time.time() - sampled}
    else:
        status(
            f"{corpus.name}: reusing the fitted transform ({layout.discovery_transform})", console
        )
        timings = {}
    if seeds is not None:
        featurise = lambda texts: centred_unit(seeds.pooled(texts), transform.mean)  # noqa: E731
    else:
        featurise = lambda texts: tfidf_features(texts, transform)  # noqa: E731
    assigning = time.time()
    assigned = assign_and_tokenize(config, layout, transform, featurise, fingerprint, progress)
    timings["assign"] = time.time() - assigning
    return _record(
        config, layout, transform, assigned, fingerprint, fit_fingerprint, timings, seed_job
    )


def _up_to_date(
    layout: RunLayout, discover: DiscoverConfig, fingerprint: str
) -> DiscoveryRecord | None:
    """The finished record when it and every cluster's token files match `fingerprint`."""
    if not layout.discovery_record.is_file():
        return None
    try:
        record = DiscoveryRecord.read(layout.discovery_record)
    except RecordError as error:
        status(f"{error}: discovering again")
        return None
    if record.fingerprint != fingerprint or list(record.clusters) != discover.domain_names:
        return None
    for name in discover.domain_names:
        for split in SPLIT_NAMES:
            try:
                if (
                    read_manifest(layout.tokens(name, split)).get("source_fingerprint")
                    != fingerprint
                ):
                    return None
                load_tokens(layout.tokens(name, split))
            except ValueError:
                return None
    return record


def _stored_transform(layout: RunLayout, fit_fingerprint: str) -> ClusterTransform | None:
    """The transform fitted before (a run killed after fitting resumes from it), if it is the
    one these settings and this corpus give."""
    try:
        transform = read_transform(layout.discovery_transform, layout.discovery_arrays)
    except (OSError, ValueError, KeyError):
        return None
    return transform if transform.settings.get("fingerprint") == fit_fingerprint else None


def _fit(
    config: ExperimentConfig,
    layout: RunLayout,
    sample: Sample,
    seeds: SeedFeatures | None,
    fit_fingerprint: str,
    seed_job: str | None,
    console: Console | None,
) -> ClusterTransform:
    """Fit the features and balanced k-means on the sample and store the transform."""
    corpus, discover = clustered_corpus(config)
    status(
        f"{corpus.name}: fitting {discover.clusters} clusters on {len(sample.texts):,} of "
        f"{sample.training_documents:,} training documents ({discover.features} features)",
        console,
    )
    arrays: dict[str, np.ndarray] = {}
    settings: dict[str, Any] = {}
    if seeds is None:
        settings, arrays, features = fit_tfidf(sample.texts, discover, corpus, config.seed)
    else:
        pooled = seeds.pooled(sample.texts)
        mean = pooled.mean(dim=0)
        features = centred_unit(pooled, mean).double().numpy()
        arrays["mean"] = mean.numpy().astype(np.float32)
    fit = balanced_kmeans(features, discover.clusters, discover.balance, config.seed)
    if seeds is None:
        top = top_terms_of_centroids(fit.centroids, arrays["components"], settings["vocabulary"])
    else:
        top = top_terms_of_members(sample.texts, fit.assignment, discover)
    arrays["centroids"] = fit.centroids.astype(np.float32)
    arrays["offsets"] = fit.offsets.astype(np.float32)
    layout.discovery.mkdir(parents=True, exist_ok=True)
    settings = {
        "format": TRANSFORM_FORMAT,
        "version": TRANSFORM_VERSION,
        "features": discover.features,
        "clusters": discover.domain_names,
        "token_pattern": TOKEN_PATTERN,
        "number_token": NUMBER_TOKEN,
        "lowercase": True,
        "sublinear_tf": True,
        "max_tokens": discover.seed_tokens if seeds else None,
        "window": config.data.seq_len if seeds else None,
        "seed_job": seed_job,
        "fingerprint": fit_fingerprint,
        "fit": {
            "sample_documents": len(sample.texts),
            "training_documents": sample.training_documents,
            "documents": sample.documents,
            "iterations": fit.iterations,
            "converged": fit.converged,
            "band": list(fit.band),
            "sample_sizes": np.bincount(fit.assignment, minlength=discover.clusters).tolist(),
            "top_terms": top,
        },
        **settings,
    }
    from safetensors.numpy import save_file

    # Arrays first, settings last: transform.json names the fingerprint a resume checks.
    with atomic_path(layout.discovery_arrays) as tmp:
        save_file({key: np.ascontiguousarray(value) for key, value in arrays.items()}, str(tmp))
    write_json(layout.discovery_transform, settings)
    return read_transform(layout.discovery_transform, layout.discovery_arrays)


def top_terms_of_centroids(
    centroids: np.ndarray, components: np.ndarray, terms: list[str], count: int = TOP_TERMS
) -> list[list[str]]:
    """Each centroid mapped back through the SVD to term weights: its `count` heaviest terms."""
    weights = centroids @ components.astype(np.float64)
    return [[terms[i] for i in np.argsort(-row, kind="stable")[:count]] for row in weights]


def top_terms_of_members(
    texts: list[str], assignment: np.ndarray, discover: DiscoverConfig, count: int = TOP_TERMS
) -> list[list[str]]:
    """Seed features have no terms: describe each cluster by the mean tf-idf of its sampled
    documents instead (empty when the sample has no vocabulary)."""
    try:
        vectorizer = tfidf_vectorizer(discover)
        tfidf = vectorizer.fit_transform(texts)
    except ValueError:
        return [[] for _ in range(discover.clusters)]
    terms = vectorizer.get_feature_names_out()
    top = []
    for j in range(discover.clusters):
        members = np.flatnonzero(assignment == j)
        mean = np.asarray(tfidf[members].mean(axis=0)).ravel() if len(members) else None
        top.append(
            []
            if mean is None
            else [str(terms[i]) for i in np.argsort(-mean, kind="stable")[:count] if mean[i] > 0]
        )
    return top


# ----------------------------------------------------------------------------------------------
# The assignment pass


_worker_transform: ClusterTransform | None = None


def _init_cost_worker(settings_path: str, arrays_path: str, parent_pid: int) -> None:
    from hdee.processes import die_with_parent

    die_with_parent(parent_pid)  # a killed `hdee discover` takes its workers with it
    torch.set_num_threads(1)  # one process per core already
    global _worker_transform
    _worker_transform = read_transform(settings_path, arrays_path)


def _costs_in_worker(texts: list[str]) -> np.ndarray:
    transform = _worker_transform
    assert transform is not None
    distances = squared_distances(tfidf_features(texts, transform), transform.centroids)
    return (distances + transform.offsets).numpy()


class CostStream:
    """The assignment costs ||x - c_j||^2 + offset_j of batches of documents, in order: in this
    process, or, for tf-idf features once POOL_MIN_CHARS of text were seen (as the tokenizer's
    Encoder decides; the same corpus always takes the same path), in one worker process per
    core that reads the stored transform, a few batches in flight. The featurising is plain
    Python (a regex and a Counter per document), so on many cores one process would hold the
    tokenizer's workers back."""

    def __init__(
        self,
        featurise: Callable[[list[str]], torch.Tensor],
        transform: ClusterTransform,
        stored: tuple[Path, Path] | None,
        num_workers: int,
        pool_min_chars: int = POOL_MIN_CHARS,
    ) -> None:
        self.featurise = featurise
        self.transform = transform
        self.stored = stored
        self.workers = resolve_workers(num_workers)
        self.pool_min_chars = pool_min_chars
        self.seen = 0
        self.pool: ProcessPoolExecutor | None = None

    def _costs(self, texts: list[str]) -> torch.Tensor:
        distances = squared_distances(self.featurise(texts), self.transform.centroids)
        return distances + self.transform.offsets

    def _maybe_start(self) -> None:
        # One worker is worth it too: it featurises while this process reads and routes.
        if self.pool is None and self.stored and self.seen >= self.pool_min_chars:
            self.pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_cost_worker,
                initargs=(str(self.stored[0]), str(self.stored[1]), os.getpid()),
            )

    def __call__(self, batches: Iterable[list[Any]]) -> Iterator[tuple[list[Any], torch.Tensor]]:
        pending: deque[tuple[list[Any], Future[np.ndarray]]] = deque()
        for batch in batches:
            texts = [doc.text for _, doc in batch]
            self.seen += sum(len(text) for text in texts)
            self._maybe_start()
            if self.pool is None:
                yield batch, self._costs(texts)
                continue
            pending.append((batch, self.pool.submit(_costs_in_worker, texts)))
            while len(pending) > 2 * self.workers:
                done, future = pending.popleft()
                yield done, torch.from_numpy(future.result())
        while pending:
            done, future = pending.popleft()
            yield done, torch.from_numpy(future.result())

    def __enter__(self) -> CostStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


@dataclass
class Assigned:
    moved: int  # documents the corpus cap moved off their cheapest cluster
    clusters: np.ndarray  # [documents] cluster index, corpus order
    splits: np.ndarray  # [documents] 0 train, 1 validation, 2 test
    labels: np.ndarray | None  # [documents] label index (data.discover.labels), or None
    label_names: list[str]
    manifests: dict[str, dict[str, dict[str, Any]]]  # cluster -> split -> manifest


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def assign_and_tokenize(
    config: ExperimentConfig,
    layout: RunLayout,
    transform: ClusterTransform,
    featurise: Callable[[list[str]], torch.Tensor],
    fingerprint: str,
    progress: bool,
) -> Assigned:
    """Every document of the corpus to its cluster, `batch_documents` at a time, tokenized into
    the cluster's split on the way (memory: one batch of documents and the tokenizer's open
    batches, whatever the corpus's size). The token files are committed only once every
    cluster has passed its checks."""
    from hdee.data.tokenizer import load_tokenizer

    corpus, discover = clustered_corpus(config)
    names = discover.domain_names
    tokenizer = load_tokenizer(layout.tokenizer)
    manifest_base = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer_id": (read_info(layout.tokenizer) or {}).get("tokenizer_id"),
        "source_fingerprint": fingerprint,
    }
    for name in names:  # left by a run killed mid-write
        for stale in layout.corpus(name).glob(".*.tmp") if layout.corpus(name).is_dir() else []:
            stale.unlink(missing_ok=True)
    dtype = token_dtype(len(tokenizer))
    writers = {
        (name, split): TokenWriter(layout.tokens(name, split), dtype)
        for name in names
        for split in SPLIT_NAMES
    }
    documents = dict.fromkeys(writers, 0)
    # Each cluster split's text fingerprint, as `hdee prepare` records for any corpus.
    text_hashes = {key: hashlib.sha256() for key in writers}
    clusters, splits, labels = array("i"), array("b"), array("i")
    label_index: dict[str, int] = {}

    def items() -> Iterator[tuple[tuple[str, str], str]]:
        for batch, costs in costs_of(batched(routed(config), discover.batch_documents)):
            for (split, doc), cluster in zip(batch, choose(costs), strict=True):
                clusters.append(cluster)
                splits.append(SPLIT_NAMES.index(split))
                if discover.labels != "none":
                    label = document_label(doc, discover.labels)
                    labels.append(label_index.setdefault(label, len(label_index)))
                text_hashes[(names[cluster], split)].update(doc.text.encode("utf-8") + b"\0")
                yield (names[cluster], split), doc.text

    choose = CappedChoice(len(names), transform.settings["fit"]["documents"], discover.balance)
    open_batch = max(64 << 10, min(BATCH_CHARS, OPEN_BATCH_CHARS // len(writers)))
    # tf-idf features of a big corpus are computed in worker processes (from the stored files);
    # a seed's run in this process, on its device.
    stored = (layout.discovery_transform, layout.discovery_arrays)
    try:
        with (
            counting(f"{corpus.name}: assigning and tokenizing", progress) as count,
            CostStream(
                featurise,
                transform,
                stored if transform.features == "tfidf" else None,
                config.data.num_workers,
            ) as costs_of,
            Encoder(layout.tokenizer, tokenizer.eos_token_id, config.data.num_workers) as encoder,
        ):
            for key, ids, n in encoder.encode_stream(
                batch_by_key(items(), open_batch, on_item=count)
            ):
                writers[key].write(ids)
                documents[key] += n
        _check_clusters(config, writers, documents)
        hashes = {key: digest.hexdigest() for key, digest in text_hashes.items()}
        manifests = _commit(layout, names, writers, documents, hashes, manifest_base)
    finally:
        for writer in writers.values():
            writer.abort()  # no-op for committed ones
    return Assigned(
        choose.moved,
        np.frombuffer(clusters, dtype=np.int32).copy(),
        np.frombuffer(splits, dtype=np.int8).copy(),
        np.frombuffer(labels, dtype=np.int32).copy() if discover.labels != "none" else None,
        list(label_index),
        manifests,
    )


def _check_clusters(
    config: ExperimentConfig,
    writers: dict[tuple[str, str], TokenWriter],
    documents: dict[tuple[str, str], int],
) -> None:
    """Every cluster needs documents in each split the ratios ask for, and at least one
    sequence of seq_len + 1 tokens in each."""
    corpus, discover = clustered_corpus(config)
    ratios = normalise(ratios_of(corpus, config))
    seq_len = config.data.seq_len
    for name in discover.domain_names:
        for split, ratio in zip(SPLIT_NAMES, ratios, strict=True):
            found, tokens = documents[(name, split)], writers[(name, split)].num_tokens
            if ratio == 0 and found == 0:
                continue
            if found == 0 or tokens < seq_len + 1:
                have = (
                    f"no {split} documents"
                    if found == 0
                    else f"{tokens} {split} tokens (< seq_len + 1 = {seq_len + 1})"
                )
                raise DiscoveryError(
                    f"data.discover.clusters: cluster {name!r} of corpus {corpus.name!r} is too "
                    f"small for its splits: it has {have}; use fewer clusters (now "
                    f"{discover.clusters}), or more, smaller documents (the source's "
                    "split_documents)"
                )


def _commit(
    layout: RunLayout,
    names: list[str],
    writers: dict[tuple[str, str], TokenWriter],
    documents: dict[tuple[str, str], int],
    text_hashes: dict[tuple[str, str], str],
    base: dict[str, Any],
) -> dict[str, dict[str, dict[str, Any]]]:
    """Replace the clusters' token files: the old record and manifests go first, so until the
    new record is written the clusters read as "not discovered" (a crash redoes the pass)."""
    layout.discovery_record.unlink(missing_ok=True)
    for directory in layout.data.glob("cluster-*"):
        if _CLUSTER_DIRECTORY.fullmatch(directory.name) and directory.name not in names:
            shutil.rmtree(directory)  # a cluster of an earlier discovery with more clusters
    for name in names:
        for split in SPLIT_NAMES:
            manifest_path(layout.tokens(name, split)).unlink(missing_ok=True)
    manifests: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in names}
    for (name, split), writer in writers.items():
        manifests[name][split] = writer.commit(
            {
                **base,
                "corpus": name,
                "split": split,
                "num_documents": documents[(name, split)],
                "text_sha256": text_hashes[(name, split)],
            }
        )
    return manifests


# ----------------------------------------------------------------------------------------------
# The record


def label_agreement(clusters: np.ndarray, labels: np.ndarray, how: str) -> LabelAgreement:
    """Purity, adjusted Rand index and NMI of the clusters against known labels."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    table = contingency_matrix(labels, clusters)
    return LabelAgreement(
        source=how,
        labels=int(table.shape[0]),
        purity=float(table.max(axis=0).sum() / table.sum()),
        adjusted_rand_index=float(adjusted_rand_score(labels, clusters)),
        normalized_mutual_info=float(normalized_mutual_info_score(labels, clusters)),
    )


def _record(
    config: ExperimentConfig,
    layout: RunLayout,
    transform: ClusterTransform,
    assigned: Assigned,
    fingerprint: str,
    fit_fingerprint: str,
    timings: dict[str, float],
    seed_job: str | None,
) -> DiscoveryRecord:
    corpus, discover = clustered_corpus(config)
    fit = transform.settings["fit"]
    names = discover.domain_names
    sizes = np.bincount(assigned.clusters, minlength=len(names))
    equal = len(assigned.clusters) / len(names)
    spread = float(np.abs(sizes / equal - 1).max())
    if assigned.moved:
        warn(
            f"corpus {corpus.name!r}: {assigned.moved:,} documents went to their second choice "
            f"or later, as their nearest cluster was full ((1 + {discover.balance:g}) x an equal "
            "share); a larger data.discover.sample_documents or balance needs fewer such moves"
        )
    summaries = {}
    for index, name in enumerate(names):
        members = assigned.clusters == index
        label_counts = None
        if assigned.labels is not None:
            counts = np.bincount(assigned.labels[members], minlength=len(assigned.label_names))
            label_counts = {assigned.label_names[i]: int(c) for i, c in enumerate(counts) if c}
        summaries[name] = ClusterSummary(
            documents={
                split: int(m["num_documents"]) for split, m in assigned.manifests[name].items()
            },
            tokens={split: int(m["num_tokens"]) for split, m in assigned.manifests[name].items()},
            sample_documents=int(fit["sample_sizes"][index]),
            top_terms=list(fit["top_terms"][index]),
            labels=label_counts,
        )
    agreement = None
    if assigned.labels is not None:
        agreement = label_agreement(assigned.clusters, assigned.labels, discover.labels)
    from safetensors.numpy import save_file

    arrays = {"cluster": assigned.clusters, "split": assigned.splits}
    if assigned.labels is not None:
        arrays["label"] = assigned.labels
    with atomic_path(layout.discovery_assignment) as tmp:
        save_file(
            arrays,
            str(tmp),
            metadata={"labels": ",".join(assigned.label_names)}
            if assigned.labels is not None
            else None,
        )
    return DiscoveryRecord(
        corpus=corpus.name,
        features=discover.features,
        seed_job=seed_job,
        fingerprint=fingerprint,
        transform_fingerprint=fit_fingerprint,
        documents=len(assigned.clusters),
        training_documents=int(fit["training_documents"]),
        sample_documents=int(fit["sample_documents"]),
        dimensions=int(transform.centroids.shape[1]),
        vocabulary=len(transform.vocabulary) if transform.features == "tfidf" else None,
        balance=discover.balance,
        sample_band=list(fit["band"]),
        fit_iterations=int(fit["iterations"]),
        converged=bool(fit["converged"]),
        corpus_spread=spread,
        corpus_cap=math.ceil(len(assigned.clusters) * (1 + discover.balance) / len(names) - 1e-9),
        capped_documents=assigned.moved,
        clusters=summaries,
        agreement=agreement,
        seconds=timings,
    )


def print_discovery(record: DiscoveryRecord, console: Console | None = None) -> None:
    """The clusters as a table: documents and tokens per split, the majority label, top terms."""
    rows = []
    for name, cluster in record.clusters.items():
        majority = ""
        if cluster.labels:
            label, count = max(cluster.labels.items(), key=lambda item: item[1])
            majority = f"{label} ({count / sum(cluster.labels.values()):.0%})"
        rows.append(
            [
                name,
                *(f"{cluster.documents[s]:,}" for s in SPLIT_NAMES),
                f"{sum(cluster.tokens.values()):,}",
                *([majority] if record.agreement else []),
                " ".join(cluster.top_terms[:6]),
            ]
        )
    numeric = [f"{split} docs" for split in SPLIT_NAMES] + ["tokens"]
    columns = ["cluster", *numeric, *(["label"] if record.agreement else []), "top terms"]
    print_table(
        columns,
        rows,
        title=f"Discovered domains of {record.corpus} ({record.features} features)",
        right=set(numeric),
        console=console,
    )
    if record.agreement:
        a = record.agreement
        status(
            f"agreement with the {a.labels} labels ({a.source} names): purity {a.purity:.3f}, "
            f"ARI {a.adjusted_rand_index:.3f}, NMI {a.normalized_mutual_info:.3f}",
            console,
        )
