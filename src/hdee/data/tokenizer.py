"""The run's tokenizer: a byte-level BPE trained on the training splits, or a pretrained one.

Either way it is saved at `RunLayout.tokenizer` as a `PreTrainedTokenizerFast` directory (plus
`hdee_tokenizer.json`: its id and what it was made from), so every later stage loads exactly the
same tokenizer with `load_tokenizer`. Its `eos_token_id` separates documents.

The tokenizer id is a hash of the tokenizer's full definition (vocabulary, merges, normaliser,
special tokens), not of how it was obtained: retraining on the same text gives the same id, and
token files made with it stay valid.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hdee.atomic import atomic_directory, read_json, write_json
from hdee.config import stable_hash
from hdee.data import DataError
from hdee.data.hub import offline_reason, unreachable_message

EOS_TOKEN = "<|endoftext|>"
INFO_FILE = "hdee_tokenizer.json"


def load_tokenizer(path: str | Path) -> Any:
    """Load a saved tokenizer directory as a `PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path}: no tokenizer.json here (run `hdee prepare` first)")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: tokenizer has no EOS token")
    return tokenizer


def tokenizer_id(tokenizer: Any) -> str:
    """Content hash of a fast tokenizer: same definition, same id."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    return stable_hash(
        {"tokenizer": definition, "eos": tokenizer.eos_token, "eos_id": tokenizer.eos_token_id}
    )


def read_info(path: str | Path) -> dict[str, Any] | None:
    """The `hdee_tokenizer.json` of a saved tokenizer, or None when there is none (yet)."""
    info_path = Path(path) / INFO_FILE
    if not info_path.is_file() or not (Path(path) / "tokenizer.json").is_file():
        return None
    try:
        info = read_json(info_path)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def save_tokenizer(tokenizer: Any, path: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """Save atomically (the whole directory appears at once) with its id; returns the info.

    The id is computed from the saved-and-reloaded tokenizer, i.e. from what later stages load.
    """
    with atomic_directory(path) as tmp:
        tokenizer.save_pretrained(str(tmp))
        saved = load_tokenizer(tmp)
        full = {
            "tokenizer_id": tokenizer_id(saved),
            "vocab_size": len(saved),
            "eos_token": saved.eos_token,
            "eos_token_id": saved.eos_token_id,
            **info,
        }
        write_json(tmp / INFO_FILE, full)
    return full


def load_pretrained(name_or_path: str) -> Any:
    """A pretrained fast tokenizer with an EOS token (added as `<|endoftext|>` if it has none)."""
    from transformers import AutoTokenizer

    what = f"tokenizer {name_or_path!r}"
    local = Path(name_or_path).expanduser()
    if not local.exists() and looks_like_a_path(name_or_path):
        raise DataError(f"{what}: no such file or directory")
    # A hub name: when the hub cannot be reached, read the cache only (seconds, not retries).
    offline = None if local.exists() else offline_reason()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=bool(offline))
    except Exception as error:  # hub / file errors come in many types
        if offline:
            raise DataError(unreachable_message(what, offline)) from None
        raise DataError(f"{what}: cannot load ({type(error).__name__}: {error})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer {name_or_path!r}: not a fast (tokenizers-backed) tokenizer; hdee needs "
            "one for batched tokenization"
        )
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    return tokenizer


def looks_like_a_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else with a slash or a leading `.`/`~` is
    meant as a local path (and a missing one should be reported as such)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _capped(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    used = 0
    for text in texts:
        if used >= max_bytes:
            return
        size = len(text.encode("utf-8"))
        if used + size > max_bytes:
            # Cut on a character boundary so the budget is respected exactly enough.
            text = text.encode("utf-8")[: max_bytes - used].decode("utf-8", errors="ignore")
            size = max_bytes - used
        used += size
        yield text


def train_bpe(texts: Iterable[str], vocab_size: int, max_bytes: int | None = None) -> Any:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation, lossless) with `<|endoftext|>` as
    EOS (id 0) and return it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Every byte is in the vocabulary, so any text (even unseen scripts) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if max_bytes is not None:
        texts = _capped(texts, max_bytes)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN)


def encode_batch(backend: Any, texts: list[str], eos_id: int) -> np.ndarray:
    """Token ids of `texts`, each followed by `eos_id`, as one uint32 array: the Rust batch
    encoder of a `tokenizers.Tokenizer` (any tokenizer; byte_level.py is faster for ours)."""
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
