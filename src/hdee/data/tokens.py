"""Flat token arrays on disk, each with a JSON manifest (nanoGPT-style `.bin`, plus a header).

The `.bin` file is the raw little-endian array; the manifest beside it says how to read it and
what it came from, so a stale or truncated file is caught before training reads garbage.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from hdee.atomic import file_mode, named_os_error, read_json, write_json

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


class TokenWriter:
    """Stream a token array into `bin_path` chunk by chunk, with bounded memory.

    Chunks go to a hidden temporary file beside the target; `commit` renames it into place and
    then writes the manifest (with the SHA-256 `content_hash` of the bytes), so a manifest never
    describes an incomplete file. Leaving the `with` block without `commit` (an error) deletes
    the temporary file: nothing half-written stays behind.
    """

    def __init__(self, bin_path: str | Path, dtype: np.dtype | str) -> None:
        self.bin_path = Path(bin_path)
        self.dtype = np.dtype(dtype)
        self.num_tokens = 0
        self._hash = hashlib.sha256()
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{self.bin_path.name}.", suffix=".tmp", dir=self.bin_path.parent
        )
        self._tmp = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._done = False

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and int(ids.max()) > np.iinfo(self.dtype).max:
            raise ValueError(
                f"{self.bin_path}: token id {int(ids.max())} does not fit {self.dtype}"
            )
        data = ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        self._hash.update(data)
        try:
            self._file.write(data)
        except OSError as error:
            raise named_os_error(error, self.bin_path) from error
        self.num_tokens += int(ids.size)

    @property
    def content_hash(self) -> str:
        return self._hash.hexdigest()

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Finish the file, move it into place, write and return the full manifest."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.chmod(self._tmp, file_mode())  # mkstemp made it 0600
            os.replace(self._tmp, self.bin_path)
        except OSError as error:
            raise named_os_error(error, self.bin_path) from error
        self._done = True
        full = {
            "format": TOKEN_FORMAT,
            "version": TOKEN_FORMAT_VERSION,
            "dtype": str(self.dtype),
            "num_tokens": self.num_tokens,
            **manifest,
            "content_hash": self.content_hash,
        }
        write_json(manifest_path(self.bin_path), full)
        return full

    def abort(self) -> None:
        """Drop the temporary file; does nothing after `commit`."""
        if self._done:
            return
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if not self._done:
            self.abort()


def write_tokens(bin_path: str | Path, tokens: np.ndarray, manifest: dict[str, Any]) -> None:
    """Write an in-memory token array and its manifest atomically (array first, manifest last,
    so a manifest never describes a file that is not complete)."""
    with TokenWriter(bin_path, tokens.dtype) as writer:
        writer.write(tokens)
        writer.commit(manifest)
