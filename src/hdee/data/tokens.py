"""Flat token arrays on disk, each with a JSON manifest (nanoGPT-style `.bin`, plus a header).

The `.bin` file is the raw little-endian array; the manifest beside it says how to read it and
what it came from, so a stale or truncated file is caught before training reads garbage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hdee.atomic import atomic_path, read_json, write_json

TOKEN_FORMAT = "hdee-tokens"
TOKEN_FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (half the disk and page cache), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def manifest_path(bin_path: str | Path) -> Path:
    return Path(bin_path).with_suffix(".json")


def read_manifest(bin_path: str | Path) -> dict[str, Any]:
    path = manifest_path(bin_path)
    if not path.is_file():
        raise ValueError(f"{path}: token manifest is missing (run `hdee prepare` again)")
    manifest = read_json(path)
    if manifest.get("format") != TOKEN_FORMAT:
        raise ValueError(f"{path}: not an hdee token manifest (format={manifest.get('format')!r})")
    if manifest.get("version") != TOKEN_FORMAT_VERSION:
        raise ValueError(
            f"{path}: token format version {manifest.get('version')!r}, this hdee reads "
            f"{TOKEN_FORMAT_VERSION}; run `hdee prepare` again"
        )
    return manifest


def load_tokens(bin_path: str | Path) -> np.memmap:
    """Memory-map a token array after checking it against its manifest."""
    bin_path = Path(bin_path)
    manifest = read_manifest(bin_path)
    dtype = np.dtype(manifest["dtype"])
    if not bin_path.is_file():
        raise ValueError(f"{bin_path}: token file is missing (run `hdee prepare` again)")
    expected = int(manifest["num_tokens"]) * dtype.itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{bin_path}: {actual} bytes on disk, manifest says {manifest['num_tokens']} tokens "
            f"of {dtype} = {expected} bytes (truncated or stale; run `hdee prepare` again)"
        )
    if expected == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty files
    return np.memmap(bin_path, dtype=dtype, mode="r")


def write_tokens(bin_path: str | Path, tokens: np.ndarray, manifest: dict[str, Any]) -> None:
    """Write an in-memory token array and its manifest atomically (array first, manifest last,
    so a manifest never describes a file that is not complete)."""
    bin_path = Path(bin_path)
    with atomic_path(bin_path) as tmp:
        tokens.tofile(tmp)
    full = {
        "format": TOKEN_FORMAT,
        "version": TOKEN_FORMAT_VERSION,
        "dtype": str(tokens.dtype),
        "num_tokens": int(tokens.size),
        **manifest,
    }
    write_json(manifest_path(bin_path), full)
