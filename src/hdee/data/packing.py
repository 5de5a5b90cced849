"""Tokenize documents in batches and pack them into one token stream per split.

Documents are grouped into batches of about `BATCH_CHARS` characters and encoded with the
tokenizer's batch encoder (Rust, several threads). Once a corpus turns out big enough to pay for
starting them, batches go to a pool of worker processes instead; at most a few batches are in
flight, so memory stays bounded however big the corpus is, and results come back in order, so
the output does not depend on the number of workers. Every document is followed by EOS.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

K = TypeVar("K")

BATCH_CHARS = 1 << 20
# Starting worker processes costs about a second; below this much text one process is faster.
POOL_MIN_CHARS = 16 << 20

_worker_encoder: BatchEncoder | None = None


def encode_batch(backend: Any, texts: list[str], eos_id: int) -> np.ndarray:
    """Token ids of `texts`, each followed by `eos_id`, as one uint32 array."""
    encodings = backend.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(texts))
    out = np.empty(int(lengths.sum()), dtype=np.uint32)
    ends = np.cumsum(lengths)
    out[ends - 1] = eos_id
    start = 0
    for encoding, end in zip(encodings, ends, strict=True):
        out[start : end - 1] = encoding.ids
        start = int(end)
    return out


# GPT-2's pre-tokenizer regex restricted to ASCII, where Python's `re` and the Rust (Oniguruma)
# `\p{L}`, `\p{N}`, `\s` agree exactly (`\s` is the Unicode White_Space set: no \x1c-\x1f).
_WS = r"\t\n\x0b\x0c\r "
ASCII_GPT2_PATTERN = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+"
    rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
_CACHE_LIMIT = 1 << 20


def byte_level_table() -> dict[int, str]:
    """GPT-2's byte -> printable character map, for the ASCII bytes (str.translate table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            char = chr(byte)
        else:
            char = chr(256 + extra)
            extra += 1
        if byte < 128:
            table[byte] = char
    return table


class BatchEncoder:
    """Encodes batches of documents exactly as `backend.encode` would, faster where it can.

    On this kind of tokenizer (byte-level BPE with GPT-2 pre-tokenisation, no normaliser: what
    `hdee prepare` trains) the Rust pre-tokeniser's regex costs far more than the BPE itself.
    For ASCII documents the same split is done with Python's `re`, and each distinct word is
    BPE-encoded once and cached: natural text repeats its words, so most are dictionary hits.
    Other documents and other tokenizers go through the Rust batch encoder unchanged. Tests check
    both paths give identical ids.
    """

    def __init__(self, backend: Any, eos_id: int) -> None:
        self.backend = backend
        self.eos_id = eos_id
        self.fast = _is_plain_byte_level_bpe(backend)
        definition = json.loads(backend.to_str())
        self._special = [t["content"] for t in definition.get("added_tokens", [])]
        self._table = byte_level_table()
        self._cache: dict[Any, tuple[int, ...]] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not self.fast:
            return encode_batch(self.backend, texts, self.eos_id)
        fast_ok = [self._fast_ok(t) for t in texts]
        slow = [t for t, ok in zip(texts, fast_ok, strict=True) if not ok]
        slow_encodings = self.backend.encode_batch_fast(slow, add_special_tokens=False)
        slow_ids = iter([tuple(e.ids) for e in slow_encodings])
        # A sequence of cache keys: a word (str), None for EOS, or the ready ids (a tuple) of a
        # document the fast path cannot take.
        keys: list[Any] = []
        for text, ok in zip(texts, fast_ok, strict=True):
            if ok:
                keys += ASCII_GPT2_PATTERN.findall(text)
            else:
                keys.append(next(slow_ids))
            keys.append(None)
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()  # bounded memory on corpora with endless distinct words
        self._cache[None] = (self.eos_id,)
        tokenize = self.backend.model.tokenize
        for word in set(keys).difference(self._cache):
            if isinstance(word, str):
                self._cache[word] = tuple(t.id for t in tokenize(word.translate(self._table)))
        # cache.get(key, key): words and EOS are looked up, ready id tuples pass through.
        ids = chain.from_iterable(map(self._cache.get, keys, keys))
        return np.fromiter(ids, dtype=np.uint32)

    def _fast_ok(self, text: str) -> bool:
        return text.isascii() and not any(token in text for token in self._special)


def _is_plain_byte_level_bpe(backend: Any) -> bool:
    definition = json.loads(backend.to_str())
    pre = definition.get("pre_tokenizer") or {}
    model = definition.get("model") or {}
    return (
        definition.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and pre.get("add_prefix_space") is False
        and model.get("type") == "BPE"
        and model.get("dropout") is None
        and not model.get("byte_fallback")
        and model.get("continuing_subword_prefix") in (None, "")
        and model.get("end_of_word_suffix") in (None, "")
    )


def _init_worker(tokenizer_file: str, eos_id: int) -> None:
    # Each worker is one process on one core; Rust threads inside it would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    global _worker_encoder
    _worker_encoder = BatchEncoder(Tokenizer.from_file(tokenizer_file), eos_id)


def _encode_in_worker(texts: list[str]) -> np.ndarray:
    assert _worker_encoder is not None
    return _worker_encoder(texts)


def resolve_workers(num_workers: int) -> int:
    """0 means one per CPU core available to this process."""
    if num_workers > 0:
        return num_workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Encoder:
    """Encodes batches of documents in order, in this process or in a worker pool.

    `tokenizer_dir` is a saved tokenizer directory (its `tokenizer.json` is what workers load).
    """

    def __init__(
        self,
        tokenizer_dir: str | Path,
        eos_id: int,
        num_workers: int = 0,
        pool_min_chars: int = POOL_MIN_CHARS,
    ) -> None:
        from tokenizers import Tokenizer

        self.tokenizer_file = str(Path(tokenizer_dir) / "tokenizer.json")
        self.backend = Tokenizer.from_file(self.tokenizer_file)
        self.encode = BatchEncoder(self.backend, eos_id)
        self.eos_id = eos_id
        self.workers = resolve_workers(num_workers)
        self.pool_min_chars = pool_min_chars
        self._pool: ProcessPoolExecutor | None = None
        self._seen_chars = 0

    def _maybe_start_pool(self) -> None:
        if self._pool is None and self.workers > 1 and self._seen_chars >= self.pool_min_chars:
            # spawn, not fork: forking a process whose Rust/torch threads hold locks can hang.
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.tokenizer_file, self.eos_id),
            )

    def encode_stream(
        self, batches: Iterable[tuple[K, list[str]]]
    ) -> Iterator[tuple[K, np.ndarray, int]]:
        """Yield (key, token ids, number of documents) for each (key, texts), in input order."""
        pending: deque[tuple[K, Future[np.ndarray] | np.ndarray, int]] = deque()
        for key, texts in batches:
            self._seen_chars += sum(len(t) for t in texts)
            self._maybe_start_pool()
            if self._pool is None:
                yield key, self.encode(texts), len(texts)
                continue
            pending.append((key, self._pool.submit(_encode_in_worker, texts), len(texts)))
            # Two batches per worker keep every worker busy; more would only use memory.
            while len(pending) > 2 * self.workers:
                yield _done(pending.popleft())
        while pending:
            yield _done(pending.popleft())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Encoder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def _done(item: tuple[K, Future[np.ndarray] | np.ndarray, int]) -> tuple[K, np.ndarray, int]:
    key, result, count = item
    return key, result.result() if isinstance(result, Future) else result, count


def batch_by_key(
    items: Iterable[tuple[K, str]],
    batch_chars: int = BATCH_CHARS,
    on_item: Callable[[str], None] | None = None,
) -> Iterator[tuple[K, list[str]]]:
    """Group (key, text) pairs into per-key batches of about `batch_chars` characters, keeping
    the order of texts within each key."""
    open_batches: dict[K, list[str]] = {}
    sizes: dict[K, int] = {}
    for key, text in items:
        if on_item is not None:
            on_item(text)
        batch = open_batches.setdefault(key, [])
        batch.append(text)
        sizes[key] = sizes.get(key, 0) + len(text)
        if sizes[key] >= batch_chars:
            yield key, open_batches.pop(key)
            sizes[key] = 0
    for key, batch in open_batches.items():
        if batch:
            yield key, batch
