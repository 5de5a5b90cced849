"""Tokenize documents in batches and pack them into one token stream per split.

Documents are grouped into batches of about `BATCH_CHARS` characters. A batch is encoded by
`batch_encoder`: the vectorised encoder of byte_level.py for the byte-level BPE `hdee prepare`
trains, the tokenizer's Rust batch encoder for any other. When the input is big enough to pay for
starting them (known up front for local files, else once enough text was seen), batches go to a
pool of worker processes, one per core; at most a few batches are in flight, so memory stays
bounded however big the corpus is, and results come back in order, so the output does not depend
on the number of workers. Every document is followed by EOS.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from hdee.data.byte_level import ByteLevelEncoder, is_plain_byte_level_bpe
from hdee.data.tokenizer import encode_batch
from hdee.processes import die_with_parent

K = TypeVar("K")

BATCH_CHARS = 1 << 20
# Starting worker processes costs about a second; below this much text one process is faster.
POOL_MIN_CHARS = 16 << 20

_worker_encoder: Callable[[list[str]], np.ndarray] | None = None


def batch_encoder(backend: Any, eos_id: int) -> Callable[[list[str]], np.ndarray]:
    """The fastest exact encoder for `backend`: vectorised for the byte-level BPE `hdee prepare`
    trains (see byte_level.py), the Rust batch encoder for any other tokenizer."""
    if is_plain_byte_level_bpe(backend):
        return ByteLevelEncoder(backend, eos_id)
    return lambda texts: encode_batch(backend, texts, eos_id)


def _init_worker(tokenizer_file: str, eos_id: int, parent_pid: int) -> None:
    # A killed `hdee prepare` / `hdee run` takes its tokenizer workers with it.
    die_with_parent(parent_pid)
    # Each worker is one process on one core; Rust threads inside it would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    global _worker_encoder
    _worker_encoder = batch_encoder(Tokenizer.from_file(tokenizer_file), eos_id)


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
        expected_chars: int = 0,
    ) -> None:
        from tokenizers import Tokenizer

        self.tokenizer_file = str(Path(tokenizer_dir) / "tokenizer.json")
        self.backend = Tokenizer.from_file(self.tokenizer_file)
        self.encode = batch_encoder(self.backend, eos_id)
        self.eos_id = eos_id
        self.workers = resolve_workers(num_workers)
        self.pool_min_chars = pool_min_chars
        self._pool: ProcessPoolExecutor | None = None
        # When the caller knows how much text is coming (local files), workers start at once and
        # load while the first batch is read; otherwise once the text seen makes them pay.
        self._seen_chars = expected_chars
        self._maybe_start_pool()

    def _maybe_start_pool(self) -> None:
        if self._pool is None and self.workers > 1 and self._seen_chars >= self.pool_min_chars:
            # spawn, not fork: forking a process whose Rust/torch threads hold locks can hang.
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.tokenizer_file, self.eos_id, os.getpid()),
            )
            self._pool.submit(int)  # starts the worker processes now, not at the first batch

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
