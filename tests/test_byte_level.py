"""The vectorised byte-level BPE encoder must give exactly the Rust tokenizer's ids."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from hdee.data import byte_level
from hdee.data.byte_level import ByteLevelEncoder, code_points, is_plain_byte_level_bpe
from hdee.data.packing import batch_encoder
from hdee.data.tokenizer import encode_batch, train_bpe

# Every class of character and every rule of the regex: contractions (and near misses), runs of
# mixed whitespace (ASCII, \x85, NBSP, ideographic, line separator), characters that are not
# `\s` (\x1c-\x1f, NUL), letters and numbers beyond ASCII, combining marks, emoji.
ALPHABET = (
    "abcXYZ019 '\t\n\r\x0b\x0c\x1c\x1f\x00!?.,;:-_()[]{}\"'s'll've're'd'm't'S'LL"
    "é\u00a0\u3000\u2028\x85\u0661\u00bd中文\u0301\U0001f600ß"
)
REAL = [
    "It's the court's view that we'll see; they've said they'd go, I'm sure.",
    "def f(x):\n    return x ** 2  # square\n\n\n\tindented\r\n",
    "naïve café résumé — Ελληνικά, русский, 日本語のテキスト, عربى ١٢٣",
    "   leading and trailing   ",
    "",
    " ",
    "'s",
]


@pytest.fixture(scope="module")
def backend() -> Any:
    rng = random.Random(0)
    texts = ["".join(rng.choice(ALPHABET) for _ in range(200)) for _ in range(200)] + REAL * 20
    return train_bpe(texts, vocab_size=400).backend_tokenizer


def random_texts(seed: int, count: int = 300) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60))) for _ in range(count)]


def test_the_tokenizer_hdee_trains_takes_the_vectorised_path(backend):
    assert is_plain_byte_level_bpe(backend)
    assert isinstance(batch_encoder(backend, 0), ByteLevelEncoder)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_word_boundaries_are_the_rust_pre_tokenizers(backend, seed: int):
    # Piece for piece, not only ids: a small vocabulary could hide a wrong boundary.
    texts = random_texts(seed) + REAL
    encoder = ByteLevelEncoder(backend, 0)
    joined = "".join(texts)
    points = code_points(joined)
    doc_first = np.zeros(len(joined), dtype=bool)
    expected = set()
    offset = 0
    for text in texts:
        if text:
            doc_first[offset] = True
        for _, (start, _) in backend.pre_tokenizer.pre_tokenize_str(text):
            expected.add(offset + start)
        offset += len(text)
    starts = byte_level.word_starts(points, encoder.classes(points), doc_first)
    assert np.flatnonzero(starts).tolist() == sorted(expected)


def test_ids_are_the_rust_tokenizers_with_eos_after_each_document(backend):
    encoder = ByteLevelEncoder(backend, eos_id=0)
    texts = random_texts(4) + REAL + ["has <|endoftext|> inside", "", "tail"]
    expected = encode_batch(backend, texts, 0)
    assert np.array_equal(encoder(texts), expected)
    assert np.array_equal(encoder(texts), expected)  # again, from a warm word cache
    ascii_only = [t for t in texts if t.isascii()]
    assert np.array_equal(encoder(ascii_only), encode_batch(backend, ascii_only, 0))
    assert np.array_equal(encoder(["", ""]), np.array([0, 0], dtype=np.uint32))
    assert encoder([]).size == 0
    assert encoder.fallback_batches == 0


def test_a_hash_collision_cannot_give_wrong_ids(backend, monkeypatch):
    # With base 1 the hash is a sum of characters: anagrams collide ("ab", "ba").
    monkeypatch.setattr(byte_level, "_HASH_BASE", 1)
    encoder = ByteLevelEncoder(backend, eos_id=0)
    texts = ["ab ba", "abc cab bca"] + REAL
    assert np.array_equal(encoder(texts), encode_batch(backend, texts, 0))
    assert encoder.fallback_batches == 1


def test_a_character_the_probes_cannot_classify_goes_through_rust(backend):
    encoder = ByteLevelEncoder(backend, eos_id=0)
    encoder.classes.table[ord("中")] = byte_level._UNKNOWN
    texts = ["plain", "中文 text"]
    assert np.array_equal(encoder(texts), encode_batch(backend, texts, 0))
    assert encoder.fallback_batches == 1


def test_other_tokenizers_use_the_rust_encoder(backend):
    from tokenizers import Tokenizer, pre_tokenizers

    prefixed = Tokenizer.from_str(backend.to_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not is_plain_byte_level_bpe(prefixed)
    with pytest.raises(ValueError, match="plain byte-level BPE"):
        ByteLevelEncoder(prefixed, 0)
    texts = REAL
    assert np.array_equal(batch_encoder(prefixed, 0)(texts), encode_batch(prefixed, texts, 0))


def test_a_huge_document_goes_through_rust_and_its_neighbours_do_not(backend, monkeypatch):
    monkeypatch.setattr(byte_level, "_MAX_DOCUMENT_CHARS", 50)
    encoder = ByteLevelEncoder(backend, eos_id=0)
    texts = ["short one", "x" * 20 + " " + "long one " * 10, "short two"]
    seen: list[list[str]] = []
    rust = encoder._encode_rust
    monkeypatch.setattr(encoder, "_encode_rust", lambda group: seen.append(group) or rust(group))
    assert np.array_equal(encoder(texts), encode_batch(backend, texts, 0))
    assert seen == [[texts[1]]]
