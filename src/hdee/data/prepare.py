"""`hdee prepare`: read every corpus, split it, tokenize it and write `RUN/data/`.

For the general corpus and each domain this writes `data/<corpus>/<split>.bin` + `.json` (see
docs/architecture.md), and the tokenizer at `data/tokenizer/`. It is idempotent: each corpus's
manifests record a `source_fingerprint` (its config, the size and mtime of its files, its split
ratios, the seed and the tokenizer id), and a corpus whose fingerprint is unchanged is skipped.
So a second run does nothing, a changed domain rebuilds only that domain, and a tokenizer whose
content changed rebuilds everything. A corpus's three splits are replaced together only after
all of them were written and checked; on an error nothing half-written stays behind.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hdee.config import Corpus, ExperimentConfig, LocalSource, stable_hash
from hdee.console import Bar, status
from hdee.console import progress as progress_bar
from hdee.data import DataError, DiscoveryError, TooFewDocuments
from hdee.data.packing import Encoder, batch_by_key
from hdee.data.sources import (
    Document,
    describe_source,
    file_format,
    iter_documents,
    source_state,
)
from hdee.data.splits import SPLIT_NAMES, normalise, route_documents
from hdee.data.tokenizer import (
    load_pretrained,
    load_tokenizer,
    read_info,
    save_tokenizer,
    train_bpe,
)
from hdee.data.tokens import TokenWriter, load_tokens, manifest_path, read_manifest, token_dtype
from hdee.layout import RunLayout

# Bump when a change to this code changes the token files it writes.
PREPARE_VERSION = 1


def prepare_data(
    config: ExperimentConfig, layout: RunLayout, progress: bool = True
) -> dict[str, Any]:
    """Prepare (or reuse) the tokenizer and the token files of every corpus.

    Returns {"tokenizer": {"id", "vocab_size", "eos_token_id", "rebuilt"},
             "corpora": {name: {"status": "rebuilt" | "skipped",
                                "splits": {split: {"tokens", "documents"}}}}}.
    """
    data = config.data
    corpora = [data.general, *data.domains]
    # A corpus data.discover clusters (hdee.discover) is tokenized by the 'discover' stage, but
    # the BPE learns from its training split too: its clusters are the run's domains.
    clustered = data.discover_corpus
    learned_from = corpora + (
        [clustered] if clustered and clustered.name != data.general.name else []
    )
    # Resolving every source first makes a missing path fail before any work is done.
    states = {corpus.name: source_state(corpus) for corpus in learned_from}
    ratios = {corpus.name: normalise(ratios_of(corpus, config)) for corpus in learned_from}

    try:
        tokenizer, tok_info, tok_rebuilt = _ensure_tokenizer(
            config, layout, learned_from, states, ratios, progress
        )
    except TooFewDocuments as error:
        if clustered is None or error.corpus != clustered.name:
            raise
        raise DiscoveryError(
            f"data.discover.corpus: {error}; its {data.discover.clusters} clusters need at least "
            "one training, validation and test document each (data.discover.clusters)"
        ) from None
    tok_id = tok_info["tokenizer_id"]
    summary: dict[str, Any] = {
        "tokenizer": {
            "id": tok_id,
            "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id,
            "rebuilt": tok_rebuilt,
        },
        "corpora": {},
    }
    base_manifest = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer_id": tok_id,
    }
    fingerprints = {
        corpus.name: stable_hash(
            {
                "version": PREPARE_VERSION,
                "source": states[corpus.name],
                "ratios": ratios[corpus.name],
                "seed": config.seed,
                "tokenizer_id": tok_id,
            }
        )
        for corpus in corpora
    }
    existing = {
        corpus.name: _existing_manifests(layout, corpus.name, fingerprints[corpus.name], tok_id)
        for corpus in corpora
    }
    to_build = [corpus for corpus in corpora if existing[corpus.name] is None]
    expected = sum(_local_bytes(states[corpus.name], corpus) for corpus in to_build)
    with Encoder(
        layout.tokenizer, tokenizer.eos_token_id, data.num_workers, expected_chars=expected
    ) as encoder:
        for corpus in corpora:
            manifests = existing[corpus.name]
            if manifests is not None:
                _check_sizes(corpus, manifests, data.seq_len, ratios[corpus.name])
                outcome = "skipped"
                if progress:
                    status(f"{corpus.name}: up to date, skipped")
            else:
                outcome = "rebuilt"
                manifests = _build_corpus(
                    corpus,
                    layout,
                    encoder,
                    progress,
                    config.seed,
                    ratios[corpus.name],
                    data.seq_len,
                    {**base_manifest, "source_fingerprint": fingerprints[corpus.name]},
                )
            summary["corpora"][corpus.name] = {
                "status": outcome,
                "splits": {
                    split: {"tokens": m["num_tokens"], "documents": m["num_documents"]}
                    for split, m in manifests.items()
                },
            }
    return summary


def _local_bytes(state: dict[str, Any], corpus: Corpus) -> int:
    """About how many bytes of text the corpus's local files hold (0 for a hub dataset or a
    capped number of documents: unknown), to decide up front whether tokenizing pays for worker
    processes. Compressed files count four times their size (text compresses about that much)."""
    if getattr(corpus.source, "max_documents", None) is not None:
        return 0
    return sum(
        size * (4 if file_format(Path(path))[1] else 1) for path, size, _ in state.get("files", [])
    )


def ratios_of(corpus: Corpus, config: ExperimentConfig) -> tuple[float, float, float]:
    split = corpus.split or config.data.split
    return (split.train, split.validation, split.test)


def split_seed(seed: int, corpus: Corpus) -> int:
    # Per-corpus seeds: document i of every domain should not land in the same split.
    return int(stable_hash([seed, corpus.name]), 16)


def routed_documents(
    corpus: Corpus, ratios: tuple[float, float, float], seed: int
) -> Iterator[tuple[str, Document]]:
    """(split, document) for every document of the corpus."""
    documents = ((doc.split, doc) for doc in iter_documents(corpus))
    try:
        yield from route_documents(documents, ratios, split_seed(seed, corpus))
    except DataError:
        raise
    except ValueError as error:  # too few documents for the splits
        hint = ""
        if isinstance(corpus.source, LocalSource) and corpus.source.split_documents == "none":
            hint = (
                " (a text file is one document; to cut big files into many, set the source's "
                "split_documents: paragraphs, or chars with chunk_chars)"
            )
        raise TooFewDocuments(
            corpus.name,
            f"corpus {corpus.name!r} ({describe_source(corpus)}): too small for its splits: "
            f"{error}{hint}",
        ) from None


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _ensure_tokenizer(
    config: ExperimentConfig,
    layout: RunLayout,
    corpora: list[Corpus],
    states: dict[str, Any],
    ratios: dict[str, tuple[float, float, float]],
    show_progress: bool,
) -> tuple[Any, dict[str, Any], bool]:
    settings = config.data.tokenizer
    if settings.kind == "bpe":
        made_from: Any = {
            "seed": config.seed,
            "corpora": [[c.name, states[c.name], ratios[c.name]] for c in corpora],
        }
    else:
        assert settings.name_or_path is not None
        local = Path(settings.name_or_path)
        files = sorted(local.rglob("*")) if local.is_dir() else [local] if local.exists() else []
        made_from = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]
    fingerprint = stable_hash(
        {
            "version": PREPARE_VERSION,
            "settings": settings.model_dump(mode="json"),
            "from": made_from,
        }
    )
    old = read_info(layout.tokenizer)
    if old is not None and old.get("fingerprint") == fingerprint:
        return load_tokenizer(layout.tokenizer), old, False

    if settings.kind == "bpe":
        share = max(1, settings.train_max_bytes // len(corpora))
        with counting("tokenizer: training BPE", show_progress) as count:
            texts = (
                text
                for corpus in corpora
                for text in _train_texts(corpus, ratios[corpus.name], config.seed, share, count)
            )
            tokenizer = train_bpe(texts, settings.vocab_size)
    else:
        tokenizer = load_pretrained(settings.name_or_path or "")
    info = save_tokenizer(
        tokenizer, layout.tokenizer, {"fingerprint": fingerprint, "kind": settings.kind}
    )
    # The saved directory is what every later stage loads; use exactly that.
    loaded = load_tokenizer(layout.tokenizer)
    rebuilt = old is None or old.get("tokenizer_id") != info["tokenizer_id"]
    if not rebuilt and show_progress:
        status("tokenizer: retrained, identical to the previous one")
    return loaded, info, rebuilt


def _train_texts(
    corpus: Corpus, ratios: tuple[float, float, float], seed: int, max_bytes: int, count: _Counter
) -> Iterator[str]:
    """Training-split texts of one corpus, at most `max_bytes` of them (cut mid-document)."""
    used = 0
    for split, doc in routed_documents(corpus, ratios, seed):
        if split != "train":
            continue
        raw = doc.text.encode("utf-8")
        if used + len(raw) >= max_bytes:
            yield raw[: max_bytes - used].decode("utf-8", errors="ignore")
            count(doc.text)
            return
        used += len(raw)
        count(doc.text)
        yield doc.text


# ----------------------------------------------------------------------------------------------
# Token files


def _existing_manifests(
    layout: RunLayout, name: str, fingerprint: str, tok_id: str
) -> dict[str, dict[str, Any]] | None:
    """The corpus's manifests when all splits are present, complete and made from these inputs."""
    manifests = {}
    for split in SPLIT_NAMES:
        path = layout.tokens(name, split)
        try:
            manifest = read_manifest(path)
            if (
                manifest.get("source_fingerprint") != fingerprint
                or manifest.get("tokenizer_id") != tok_id
            ):
                return None
            load_tokens(path)  # checks the file is there and has the manifest's size
        except ValueError:
            return None
        manifests[split] = manifest
    return manifests


def _check_sizes(
    corpus: Corpus,
    manifests: dict[str, dict[str, Any]],
    seq_len: int,
    ratios: tuple[float, float, float],
) -> None:
    if sum(m["num_documents"] for m in manifests.values()) == 0:
        raise DataError(
            f"corpus {corpus.name!r} ({describe_source(corpus)}): no documents "
            "(every file is empty or has no records)"
        )
    for (split, manifest), ratio in zip(manifests.items(), ratios, strict=True):
        if manifest["num_documents"] == 0 and ratio == 0:
            continue  # a split the config asks to leave empty
        if manifest["num_documents"] == 0:
            raise DataError(
                f"corpus {corpus.name!r} ({describe_source(corpus)}): too small for its splits: "
                f"split {split!r} got no documents; add documents or change the split ratios"
            )
        if manifest["num_tokens"] < seq_len + 1:
            raise DataError(
                f"corpus {corpus.name!r} ({describe_source(corpus)}): split {split!r} has "
                f"{manifest['num_tokens']} tokens, fewer than one sequence of seq_len + 1 = "
                f"{seq_len + 1}; add text or lower data.seq_len"
            )


def _build_corpus(
    corpus: Corpus,
    layout: RunLayout,
    encoder: Encoder,
    show_progress: bool,
    seed: int,
    ratios: tuple[float, float, float],
    seq_len: int,
    manifest: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    directory = layout.corpus(corpus.name)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".*.tmp"):  # left by a run that was killed mid-write
        stale.unlink(missing_ok=True)
    dtype = token_dtype(int(manifest["vocab_size"]))
    writers = {
        split: TokenWriter(layout.tokens(corpus.name, split), dtype) for split in SPLIT_NAMES
    }
    documents = dict.fromkeys(SPLIT_NAMES, 0)
    text_hashes = {split: hashlib.sha256() for split in SPLIT_NAMES}

    def hashed(items: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
        # The text's own fingerprint, independent of the tokenizer: the report prints it so a
        # reader can tell "different text" from "different result" (docs/architecture.md).
        for split, text in items:
            text_hashes[split].update(text.encode("utf-8") + b"\0")
            yield split, text

    try:
        with counting(f"{corpus.name}: tokenizing", show_progress) as count:
            items = ((split, doc.text) for split, doc in routed_documents(corpus, ratios, seed))
            batches = batch_by_key(hashed(items), on_item=count)
            for split, ids, n in encoder.encode_stream(batches):
                writers[split].write(ids)
                documents[split] += n
        sizes = {
            split: {"num_documents": documents[split], "num_tokens": writers[split].num_tokens}
            for split in SPLIT_NAMES
        }
        _check_sizes(corpus, sizes, seq_len, ratios)
        # Old manifests go first: from here until the new ones are written, the corpus reads as
        # "not prepared" rather than as old manifests describing new files.
        for split in SPLIT_NAMES:
            manifest_path(layout.tokens(corpus.name, split)).unlink(missing_ok=True)
        return {
            split: writers[split].commit(
                {
                    **manifest,
                    "corpus": corpus.name,
                    "split": split,
                    "num_documents": documents[split],
                    "text_sha256": text_hashes[split].hexdigest(),
                }
            )
            for split in SPLIT_NAMES
        }
    finally:
        for writer in writers.values():
            writer.abort()  # no-op for committed ones
        if not any(directory.iterdir()):
            directory.rmdir()


# ----------------------------------------------------------------------------------------------
# Progress


class _Counter:
    """Counts the documents and bytes read into one progress bar (documents, MB so far)."""

    def __init__(self, bar: Bar) -> None:
        self.bar = bar
        self.documents = 0
        self.chars = 0

    def __call__(self, text: str) -> None:
        self.documents += 1
        self.chars += len(text)
        # Updating per document would cost more than tokenizing small ones.
        if self.documents % 256 == 0:
            self.flush()

    def flush(self) -> None:
        self.bar.update(self.documents, MB=f"{self.chars / 1e6:,.1f}")


@contextlib.contextmanager
def counting(description: str, enabled: bool) -> Iterator[_Counter]:
    with progress_bar(description, unit="docs", enabled=enabled, MB="0.0") as bar:
        counter = _Counter(bar)
        try:
            yield counter
        finally:
            counter.flush()
