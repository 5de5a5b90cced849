"""Exact, vectorised encoding for byte-level BPE tokenizers with GPT-2 pre-tokenisation.

This is the tokenizer `hdee prepare` trains. On it, the Rust pre-tokeniser (the regex below)
costs more than the BPE merges, and both run one document at a time. `ByteLevelEncoder` gets the
same ids for a whole batch of documents at once:

1. the batch's characters become one array of code points, and each gets a class (letter,
   number, whitespace, other) from a table filled by asking the tokenizer's own pre-tokeniser,
   so the classes agree with its Unicode tables by construction;
2. word boundaries follow from array operations (the rules are spelled out in `word_starts`);
3. every word gets a 64-bit polynomial hash, `np.unique` finds the distinct ones, and every word
   is checked character by character against its representative, so a hash collision can never
   give wrong ids (the batch goes through the Rust encoder instead);
4. each distinct word is BPE-encoded once and cached across batches: text repeats its words;
5. one gather assembles the ids, with EOS after every document.

The result is identical to `backend.encode_batch(texts)` followed by EOS after each document;
tests compare the two on adversarial strings and on real text.

GPT-2's pre-tokenisation regex, for reference:
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
"""

from __future__ import annotations

import json
from itertools import chain
from typing import Any

import numpy as np

from hdee.data.tokenizer import encode_batch

LETTER, NUMBER, SPACE, OTHER = 0, 1, 2, 3
_UNSEEN = 254  # table entry for a code point not classified yet
_UNKNOWN = 255  # the probes disagreed: such a batch goes through the Rust encoder
_MAX_CODE_POINT = 0x110000
_CACHE_LIMIT = 1 << 18  # distinct words kept between batches (about 50 MB per process)
# The vectorised path holds about 50 bytes per character of a batch; a document longer than this
# (a whole book as one record) goes through the Rust encoder so memory stays bounded.
_MAX_DOCUMENT_CHARS = 1 << 22
_HASH_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_LENGTH_MIX = 0xC2B2AE3D27D4EB4F
_CONTRACTION_2 = (ord("s"), ord("t"), ord("m"), ord("d"))
_CONTRACTION_3 = ((ord("r"), ord("e")), (ord("v"), ord("e")), (ord("l"), ord("l")))


def is_plain_byte_level_bpe(backend: Any) -> bool:
    """True for a `tokenizers.Tokenizer` this module encodes exactly: byte-level BPE with the
    GPT-2 regex, no normaliser, no prefix space, no dropout or word affixes."""
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


def byte_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map (index = byte), as the BPE vocabulary spells it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: list[str] = []
    extra = 0
    for byte in range(256):
        if byte in printable:
            table.append(chr(byte))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


class CharClasses:
    """Code point -> LETTER / NUMBER / SPACE / OTHER, as the tokenizer's regex sees them.

    Python's `unicodedata` may be a different Unicode version from the Rust regex engine's, so
    instead of trusting it, each new code point is classified by pre-tokenising four probes with
    the tokenizer itself: "a"+c is one word iff c is a letter, "1"+c iff a number, "."+c iff
    "other", "\\t"+c iff whitespace. A code point for which not exactly one probe says so is
    marked unknown (never seen in practice).
    """

    def __init__(self, pre_tokenizer: Any) -> None:
        self.pre_tokenizer = pre_tokenizer
        self.table = np.full(_MAX_CODE_POINT, _UNSEEN, dtype=np.uint8)
        self.probe(np.arange(128))

    def __call__(self, points: np.ndarray) -> np.ndarray:
        if points.dtype == np.uint8:  # ASCII text: all classified at start-up
            return self.table[:128][points]
        classes = self.table[points]
        if (classes == _UNSEEN).any():
            self.probe(np.unique(points[classes == _UNSEEN]))
            classes = self.table[points]
        return classes

    def probe(self, points: np.ndarray) -> None:
        chars = [chr(int(p)) for p in points]
        # Each probe is two characters after a newline; a word starting at the probe's second
        # character means the two were split.
        text = "".join(f"\na{c}\n1{c}\n.{c}\n\t{c}" for c in chars)
        starts = {start for _, (start, _) in self.pre_tokenizer.pre_tokenize_str(text)}
        for index, point in enumerate(points):
            base = index * 12
            joined = [base + 3 * k + 2 not in starts for k in range(4)]
            if sum(joined) == 1:
                self.table[point] = (LETTER, NUMBER, OTHER, SPACE)[joined.index(True)]
            else:
                self.table[point] = _UNKNOWN


def code_points(text: str) -> np.ndarray:
    """The code points of `text`: uint8 for ASCII (a quarter of the memory), else uint32."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def word_starts(points: np.ndarray, classes: np.ndarray, doc_first: np.ndarray) -> np.ndarray:
    """Boolean array: True where a pre-tokenisation word starts.

    `doc_first` is True at the first character of each document (words never cross documents).
    The regex's behaviour, as rules over runs of characters of one class:
    1. each run starts a word, and so does each document;
    2. a whitespace character followed by a non-whitespace one (in the same document) starts a
       word of its own (`\\s+(?!\\S)` stops before it); if it is a space it also takes in the
       run that follows (` ?\\p{L}+` and friends), which then does not start a word;
    3. an apostrophe that starts a word and is followed by s, t, m, d, re, ve or ll makes a word
       of those characters, and the letters after it start a new word.
    """
    n = points.shape[0]
    starts = doc_first.copy()
    if n == 0:
        return starts
    starts[1:] |= classes[1:] != classes[:-1]
    # next_same[i]: character i + 1 exists and is in the same document as i.
    next_same = np.zeros(n, dtype=bool)
    next_same[:-1] = ~doc_first[1:]
    space = classes == SPACE
    # Rule 2.
    last_space = np.zeros(n, dtype=bool)
    last_space[:-1] = space[:-1] & ~space[1:] & next_same[:-1]
    starts |= last_space
    attaches = last_space & (points == ord(" "))
    starts[1:] &= ~attaches[:-1]
    # Rule 3.
    apostrophes = np.flatnonzero((points == ord("'")) & starts)
    if apostrophes.size:
        first = _shifted(points, doc_first, apostrophes, 1)
        second = _shifted(points, doc_first, apostrophes, 2)
        short = np.isin(first, _CONTRACTION_2)
        long = np.zeros_like(short)
        for a, b in _CONTRACTION_3:
            long |= (first == a) & (second == b)
        for where, length in ((apostrophes[short], 2), (apostrophes[long], 3)):
            starts[where + 1] = False
            after = where + length
            starts[after[after < n]] = True
    return starts


def _shifted(points: np.ndarray, doc_first: np.ndarray, at: np.ndarray, offset: int) -> np.ndarray:
    """points[at + offset] where that character is in the same document as `at`, else -1."""
    values = np.full(at.shape[0], -1, dtype=np.int64)
    ok = at + offset < points.shape[0]
    for step in range(1, offset + 1):
        ok[ok] &= ~doc_first[at[ok] + step]
    values[ok] = points[at[ok] + offset]
    return values


class _Powers:
    """base**i and base**-i modulo 2**64 (numpy uint64 arithmetic wraps), grown on demand."""

    def __init__(self) -> None:
        self.forward = np.ones(1, dtype=np.uint64)
        self.inverse = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.forward.shape[0] < n:
            size = max(n, 2 * self.forward.shape[0])
            inverse_base = pow(_HASH_BASE, -1, 1 << 64)
            with np.errstate(over="ignore"):
                self.forward = np.cumprod(np.full(size, _HASH_BASE, dtype=np.uint64))
                self.forward = np.concatenate([[np.uint64(1)], self.forward[:-1]])
                self.inverse = np.cumprod(np.full(size, inverse_base, dtype=np.uint64))
                self.inverse = np.concatenate([[np.uint64(1)], self.inverse[:-1]])
        return self.forward[:n], self.inverse[:n]


class ByteLevelEncoder:
    """Encodes batches of documents to the ids `backend` gives, each followed by `eos_id`.

    `backend` is a `tokenizers.Tokenizer` for which `is_plain_byte_level_bpe` holds. Documents
    containing a special token's text or longer than `_MAX_DOCUMENT_CHARS`, batches with an
    unclassifiable character and batches with a hash collision go through
    `backend.encode_batch_fast` instead (same ids, slower).
    """

    def __init__(self, backend: Any, eos_id: int) -> None:
        if not is_plain_byte_level_bpe(backend):
            raise ValueError("ByteLevelEncoder needs a plain byte-level BPE tokenizer")
        self.backend = backend
        self.eos_id = eos_id
        definition = json.loads(backend.to_str())
        self.special = [t["content"] for t in definition.get("added_tokens", [])]
        self.classes = CharClasses(backend.pre_tokenizer)
        self.byte_chars = "".join(byte_to_unicode())
        self.latin1_to_byte_chars = str.maketrans(dict(enumerate(self.byte_chars)))
        self.cache: dict[str, tuple[int, ...]] = {}
        self.powers = _Powers()
        self.fallback_batches = 0  # batches the vectorised path handed to Rust (for tests)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Ids of `texts`, each followed by EOS, as one uint32 array, in order."""
        parts: list[np.ndarray] = []
        group: list[str] = []
        group_fast = True
        for text in texts:
            fast = len(text) <= _MAX_DOCUMENT_CHARS and not any(
                token in text for token in self.special
            )
            if fast != group_fast and group:
                parts.append(self._encode_group(group, group_fast))
                group = []
            group_fast = fast
            group.append(text)
        if group:
            parts.append(self._encode_group(group, group_fast))
        if not parts:
            return np.zeros(0, dtype=np.uint32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _encode_group(self, texts: list[str], fast: bool) -> np.ndarray:
        ids = self._encode_vectorised(texts) if fast else None
        if ids is None:
            if fast:
                self.fallback_batches += 1
            ids = self._encode_rust(texts)
        return ids

    def _encode_rust(self, texts: list[str]) -> np.ndarray:
        return encode_batch(self.backend, texts, self.eos_id)

    def _encode_vectorised(self, texts: list[str]) -> np.ndarray | None:
        joined = "".join(texts)
        points = code_points(joined)
        n = points.shape[0]
        if n == 0:
            return np.full(len(texts), self.eos_id, dtype=np.uint32)
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        doc_offsets = np.concatenate([[0], np.cumsum(lengths)])
        doc_first = np.zeros(n, dtype=bool)
        doc_first[doc_offsets[:-1][lengths > 0]] = True
        classes = self.classes(points)
        if points.dtype != np.uint8 and (classes == _UNKNOWN).any():
            return None

        # Words: [word_start[k], word_end[k]).
        word_start = np.flatnonzero(word_starts(points, classes, doc_first))
        word_end = np.append(word_start[1:], n)
        word_length = word_end - word_start

        # Distinct words by hash, then verified exactly.
        forward, inverse = self.powers.get(n)
        with np.errstate(over="ignore"):
            prefix = np.zeros(n + 1, dtype=np.uint64)
            np.cumsum((points.astype(np.uint64) + np.uint64(1)) * forward, out=prefix[1:])
            hashes = (prefix[word_end] - prefix[word_start]) * inverse[word_start]
            hashes ^= word_length.astype(np.uint64) * np.uint64(_LENGTH_MIX)
        # np.unique would do the same with a stable sort, at twice the cost.
        order = np.argsort(hashes)
        sorted_hashes = hashes[order]
        opens_kind = np.empty(order.shape[0], dtype=bool)
        opens_kind[:1] = True
        np.not_equal(sorted_hashes[1:], sorted_hashes[:-1], out=opens_kind[1:])
        first_word = order[opens_kind]  # one representative word per distinct hash
        word_kind = np.empty_like(order)
        word_kind[order] = np.cumsum(opens_kind) - 1
        if not _same_as_representatives(points, word_start, word_length, first_word, word_kind):
            return None

        # Ids of each distinct word (cached), flattened, with EOS as one more "word".
        if len(self.cache) > _CACHE_LIMIT:
            self.cache.clear()  # bounded memory on corpora with endless distinct words
        words = [
            joined[start:end]
            for start, end in zip(
                word_start[first_word].tolist(), word_end[first_word].tolist(), strict=True
            )
        ]
        kind_ids = list(map(self.cache.get, words))
        for index in [i for i, ids in enumerate(kind_ids) if ids is None]:
            kind_ids[index] = self._bpe(words[index])
        kind_ids.append((self.eos_id,))
        eos_kind = len(kind_ids) - 1
        kind_length = np.fromiter(map(len, kind_ids), dtype=np.int64, count=len(kind_ids))
        kind_offset = np.cumsum(kind_length) - kind_length
        flat_ids = np.fromiter(
            chain.from_iterable(kind_ids), dtype=np.uint32, count=int(kind_length.sum())
        )

        # The document's words in order, EOS after each document (empty ones too).
        # (np.insert would do it too, but sorts its positions first.)
        eos_before = np.searchsorted(word_start, doc_offsets[1:])  # word index each EOS precedes
        is_eos = np.zeros(word_kind.shape[0] + len(texts), dtype=bool)
        is_eos[eos_before + np.arange(len(texts))] = True
        sequence = np.empty(is_eos.shape[0], dtype=word_kind.dtype)
        sequence[is_eos] = eos_kind
        sequence[~is_eos] = word_kind
        out_length = kind_length[sequence]
        out_start = np.cumsum(out_length) - out_length
        gather = np.repeat(kind_offset[sequence] - out_start, out_length)
        gather += np.arange(gather.shape[0])
        return flat_ids[gather]

    def _bpe(self, word: str) -> tuple[int, ...]:
        """BPE ids of one pre-tokenised word (spelled in GPT-2's byte characters), cached."""
        if word.isascii():
            spelled = word.translate(self.latin1_to_byte_chars)
        else:
            spelled = word.encode("utf-8").decode("latin-1").translate(self.latin1_to_byte_chars)
        ids = tuple(token.id for token in self.backend.model.tokenize(spelled))
        self.cache[word] = ids
        return ids


def _same_as_representatives(
    points: np.ndarray,
    word_start: np.ndarray,
    word_length: np.ndarray,
    first_word: np.ndarray,
    word_kind: np.ndarray,
) -> bool:
    """True when every word equals the representative of its hash, character by character."""
    representative = first_word[word_kind]
    if not np.array_equal(word_length[representative], word_length):
        return False
    shift = np.repeat(word_start[representative] - word_start, word_length)
    shift += np.arange(points.shape[0])
    return bool(np.array_equal(points[shift], points))
