"""Read the documents of a corpus: a Hugging Face dataset or local files.

Every document is a `Document(text, split, origin)`: `split` is the source's own split
("train" / "validation" / "test") or None when hdee should split it; `origin` names the file or
dataset it came from, for error messages. Bad input raises `DataError` naming the corpus and file.

Local formats: .txt/.md (and other plain-text files: one document per file), .jsonl (one record
per line), .json (a list of records or of strings), .parquet (column `text_field`), and
directories (recursively, every file with one of those suffixes). Text, jsonl and json files may
be compressed: `.gz`, or `.zst` with the `zstandard` package (`pip install hdee[zstd]`); they
are decompressed as they are read. Empty documents are skipped.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any, NamedTuple

from hdee.config import Corpus, HFSource, LocalSource
from hdee.data import DataError
from hdee.data.hub import cache_only, offline_reason, unreachable_message

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
DIRECTORY_SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
COMPRESSION_SUFFIXES = (".gz", ".zst")

# Dataset split names that mean one of ours.
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
}
# The datasets library's builders for plain files (`load_dataset("json", data_files=...)`).
_PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "xml", "sql")
_PARQUET_BATCH_ROWS = 1024
_HF_BATCH_ROWS = 1000


class Document(NamedTuple):
    text: str
    split: str | None
    origin: str


def corpus_label(corpus: Corpus) -> str:
    return f"corpus {corpus.name!r}"


# ----------------------------------------------------------------------------------------------
# Which files a source means


def local_files(corpus: Corpus) -> list[Path]:
    """Every file a local source reads, in a fixed order (sorted per pattern, de-duplicated).
    A path that does not exist or a glob matching nothing is an error, not an empty corpus."""
    source = corpus.source
    assert isinstance(source, LocalSource)
    files: list[Path] = []
    for pattern in source.paths:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True))
            matches = [p for p in matches if p.is_file() or p.is_dir()]
            if not matches:
                raise DataError(f"{corpus_label(corpus)}: glob {pattern!r} matches no files")
        else:
            path = Path(expanded)
            if not path.exists():
                raise DataError(f"{corpus_label(corpus)}: path {pattern!r} does not exist")
            matches = [path]
        for match in matches:
            if match.is_dir():
                found = sorted(
                    p
                    for p in match.rglob("*")
                    if p.is_file()
                    and _readable_in_directory(p)
                    and not any(part.startswith(".") for part in p.relative_to(match).parts)
                )
                if not found:
                    raise DataError(
                        f"{corpus_label(corpus)}: directory {str(match)!r} holds no files with "
                        f"suffix {', '.join(DIRECTORY_SUFFIXES)} (text, jsonl and json files may "
                        f"also end in {' or '.join(COMPRESSION_SUFFIXES)})"
                    )
                files.extend(found)
            else:
                files.append(match)
    unique: dict[Path, None] = dict.fromkeys(p.resolve() for p in files)
    return list(unique)


def file_format(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None): "a.jsonl.gz" -> (".jsonl", ".gz")."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSION_SUFFIXES:
        return Path(path.stem).suffix.lower(), suffix
    return suffix, None


def _readable_in_directory(path: Path) -> bool:
    fmt, compression = file_format(path)
    return fmt in DIRECTORY_SUFFIXES and not (compression and fmt == ".parquet")


def _hf_local_data_files(source: HFSource) -> list[Path]:
    """The local files `data_files` names (its globs expanded); repo-relative names match none."""
    patterns: list[str] = []
    files = source.data_files
    for value in files.values() if isinstance(files, dict) else [files]:
        if isinstance(value, str):
            patterns.append(value)
        elif isinstance(value, list):
            patterns.extend(value)
    found: list[Path] = []
    for pattern in patterns:
        found += sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    return [p for p in found if p.is_file()]


def _hf_local_path(source: HFSource) -> Path | None:
    path = Path(os.path.expanduser(source.path))
    return path if path.exists() else None


def source_state(corpus: Corpus) -> dict[str, Any]:
    """What the corpus's content depends on, cheaply: its config and the (path, size, mtime) of
    every local file. A change here means the corpus must be prepared again."""
    state: dict[str, Any] = {"config": corpus.model_dump(mode="json")}
    if isinstance(corpus.source, LocalSource):
        paths = local_files(corpus)
    else:
        root = _hf_local_path(corpus.source)
        paths = _hf_local_data_files(corpus.source)
        if root is not None:
            paths += sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        if not paths:
            # A hub dataset: its name/config/split/revision identify it (pin `revision`).
            return state
    files = []
    for path in paths:
        stat = path.stat()
        files.append([str(path), stat.st_size, stat.st_mtime_ns])
    state["files"] = files
    return state


def describe_source(corpus: Corpus) -> str:
    source = corpus.source
    if isinstance(source, LocalSource):
        return "paths " + ", ".join(source.paths)
    return f"dataset {source.path!r}" + (f" ({source.name})" if source.name else "")


# ----------------------------------------------------------------------------------------------
# Reading


def iter_documents(corpus: Corpus) -> Iterator[Document]:
    """Yield the corpus's documents in a fixed order, at most `max_documents` (for a dataset
    with its own train/validation/test splits: at most that many per split, so none of them
    disappears)."""
    source = corpus.source
    if isinstance(source, LocalSource):
        docs = split_documents(_iter_local(corpus, source), source)
        limit = source.max_documents
        for count, doc in enumerate(docs):
            if limit is not None and count >= limit:
                return
            yield doc
    else:
        yield from _iter_hf(corpus, source)


def _iter_local(corpus: Corpus, source: LocalSource) -> Iterator[Document]:
    for path in local_files(corpus):
        fmt, compression = file_format(path)
        if fmt == ".jsonl":
            yield from _read_jsonl(corpus, path, source.text_field)
        elif fmt == ".json":
            yield from _read_json(corpus, path, source.text_field)
        elif fmt == ".parquet":
            if compression is not None:
                raise DataError(
                    f"{corpus_label(corpus)}: {path}: a compressed parquet file; parquet "
                    "compresses its own columns, give the .parquet file itself"
                )
            yield from _read_parquet(corpus, path, source.text_field)
        else:
            text = _decode(corpus, path, _read_bytes(corpus, path), 0)
            if text:
                yield Document(text, None, str(path))


def split_documents(docs: Iterator[Document], source: LocalSource) -> Iterator[Document]:
    """Each document cut as `source.split_documents` says (see LocalSource)."""
    if source.split_documents == "none":
        yield from docs
        return
    for doc in docs:
        if source.split_documents == "paragraphs":
            pieces = paragraphs(doc.text)
        else:
            assert source.chunk_chars is not None
            pieces = chunks(doc.text, source.chunk_chars)
        for piece in pieces:
            yield Document(piece, doc.split, doc.origin)


_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def paragraphs(text: str) -> list[str]:
    """The runs of text between blank lines (a line of only spaces is blank), stripped."""
    return [part.strip() for part in _BLANK_LINES.split(text) if part.strip()]


def chunks(text: str, size: int) -> list[str]:
    """Consecutive pieces of about `size` characters that end at line ends, so no line is cut;
    a single line longer than `size` is cut at spaces (or, without any, every `size`)."""
    pieces: list[str] = []
    current: list[str] = []
    length = 0
    for line in _short_lines(text, size):
        if current and length + len(line) > size:
            pieces.append("".join(current))
            current, length = [], 0
        current.append(line)
        length += len(line)
    if current:
        pieces.append("".join(current))
    return [piece.strip() for piece in pieces if piece.strip()]


def _short_lines(text: str, size: int) -> Iterator[str]:
    for line in text.splitlines(keepends=True):
        while len(line) > size:
            cut = line.rfind(" ", 0, size) + 1 or size
            yield line[:cut]
            line = line[cut:]
        if line:
            yield line


def _open_binary(corpus: Corpus, path: Path) -> IO[bytes]:
    """The file's bytes, decompressed on the fly for .gz / .zst."""
    _, compression = file_format(path)
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{corpus_label(corpus)}: {path}: reading .zst files needs the zstandard "
                "package (pip install zstandard)"
            ) from None
        raw = open(path, "rb")  # noqa: SIM115 - closed with the stream reader (closefd)
        reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(reader)  # type: ignore[arg-type]
    return open(path, "rb")


def _is_decompression_error(error: BaseException) -> bool:
    # gzip: BadGzipFile (an OSError), EOFError when truncated, zlib.error; zstandard: ZstdError.
    return isinstance(error, (OSError, EOFError, zlib.error)) or (
        type(error).__name__ == "ZstdError"
    )


@contextmanager
def _unreadable_as_data_error(corpus: Corpus, path: Path) -> Iterator[None]:
    """Turn a read or decompression failure into a DataError naming the file."""
    try:
        yield
    except DataError:
        raise
    except Exception as error:
        if not _is_decompression_error(error):
            raise
        what = "compressed file" if file_format(path)[1] else "file"
        raise DataError(
            f"{corpus_label(corpus)}: {path}: unreadable {what} ({type(error).__name__}: {error})"
        ) from None


def _read_bytes(corpus: Corpus, path: Path) -> bytes:
    with _unreadable_as_data_error(corpus, path), _open_binary(corpus, path) as handle:
        return handle.read()


def _decode(corpus: Corpus, path: Path, raw: bytes, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        where = "byte offset" if file_format(path)[1] is None else "decompressed byte offset"
        raise DataError(
            f"{corpus_label(corpus)}: {path}: invalid UTF-8 at {where} {offset + error.start}"
        ) from None


def _text_of(corpus: Corpus, path: Path, record: Any, field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(
            f"{corpus_label(corpus)}: {path}: {where}: expected an object with a {field!r} "
            f"field, got {type(record).__name__}"
        )
    if field not in record:
        keys = ", ".join(sorted(map(str, record))[:10]) or "none"
        raise DataError(
            f"{corpus_label(corpus)}: {path}: {where}: missing text field {field!r} "
            f"(fields: {keys}; set source.text_field)"
        )
    text = record[field]
    if not isinstance(text, str):
        raise DataError(
            f"{corpus_label(corpus)}: {path}: {where}: text field {field!r} is "
            f"{type(text).__name__}, expected a string"
        )
    return text


def _read_jsonl(corpus: Corpus, path: Path, field: str) -> Iterator[Document]:
    offset = 0
    origin = str(path)
    with _unreadable_as_data_error(corpus, path), _open_binary(corpus, path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode(corpus, path, raw, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{corpus_label(corpus)}: {path}: line {number}: invalid JSON ({error.msg})"
                ) from None
            text = _text_of(corpus, path, record, field, f"line {number}")
            if text:
                yield Document(text, None, origin)


def _read_json(corpus: Corpus, path: Path, field: str) -> Iterator[Document]:
    content = _decode(corpus, path, _read_bytes(corpus, path), 0)
    try:
        data = json.loads(content)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{corpus_label(corpus)}: {path}: invalid JSON at line {error.lineno} ({error.msg})"
        ) from None
    if isinstance(data, dict):
        # A single record, or {"data": [...]}-style wrappers are not guessed at: one record.
        data = [data]
    if not isinstance(data, list):
        raise DataError(
            f"{corpus_label(corpus)}: {path}: expected a JSON list of records or strings"
        )
    origin = str(path)
    for number, record in enumerate(data):
        text = _text_of(corpus, path, record, field, f"item {number}")
        if text:
            yield Document(text, None, origin)


def _read_parquet(corpus: Corpus, path: Path, field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    origin = str(path)
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if field not in names:
            raise DataError(
                f"{corpus_label(corpus)}: {path}: missing text field {field!r} "
                f"(columns: {', '.join(names) or 'none'}; set source.text_field)"
            )
        column_type = parquet.schema_arrow.field(field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataError(
                f"{corpus_label(corpus)}: {path}: column {field!r} is {column_type}, "
                "expected strings"
            )
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield Document(text, None, origin)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{corpus_label(corpus)}: {path}: unreadable parquet ({error})") from None


def _iter_hf(corpus: Corpus, source: HFSource) -> Iterator[Document]:
    import datasets

    label = f"{corpus_label(corpus)}: dataset {source.path!r}"
    local = _hf_local_path(source)
    offline: str | None = None
    try:
        if (
            local is not None
            and local.is_dir()
            and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file())
        ):
            # A directory written by `save_to_disk` is read with `load_from_disk`.
            loaded = datasets.load_from_disk(str(local))
            if source.split is not None:
                loaded = loaded[source.split]
        else:
            offline = None if _needs_no_hub(source) else offline_reason()
            with cache_only() if offline else nullcontext():
                loaded = datasets.load_dataset(
                    source.path,
                    source.name,
                    split=source.split,
                    streaming=source.streaming,
                    revision=source.revision,
                    data_files=source.data_files,
                )
    except Exception as error:  # datasets raises many types; all mean "cannot read this"
        if offline:
            raise DataError(unreachable_message(label, offline)) from None
        raise DataError(f"{label}: cannot load ({type(error).__name__}: {error})") from None

    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        parts = _own_splits(list(loaded.keys()))
        if not parts:
            raise DataError(f"{label}: no usable split among {sorted(loaded.keys())}")
        for name, tag in parts:
            yield from _iter_hf_split(loaded[name], tag, source, f"{label} split {name!r}")
    else:
        yield from _iter_hf_split(loaded, None, source, label)


def _needs_no_hub(source: HFSource) -> bool:
    """A local dataset directory or script, or a packaged builder (json, parquet, text, csv)
    over files that are all local, loads without the hub."""
    if _hf_local_path(source) is not None:
        return True
    if source.path not in _PACKAGED_BUILDERS:
        return False
    files = source.data_files
    names = [
        name
        for value in (files.values() if isinstance(files, dict) else [files])
        for name in ([value] if isinstance(value, str) else value or [])
    ]
    return all("://" not in name for name in names)


def _own_splits(names: list[str]) -> list[tuple[str, str | None]]:
    """Which of a dataset's splits to read and what each becomes. With train, validation and
    test all present, each keeps its split. Otherwise only the train split (or the only split)
    is read and hdee splits it: re-splitting a lone train split is the usual case, and mixing a
    dataset's own test set into training would leak it."""
    known = {_SPLIT_ALIASES[name]: name for name in names if name in _SPLIT_ALIASES}
    if set(known) == {"train", "validation", "test"}:
        return [(known[ours], ours) for ours in ("train", "validation", "test")]
    if len(names) == 1:
        return [(names[0], None)]
    if "train" in known:
        return [(known["train"], None)]
    return []


def _iter_hf_split(
    dataset: Any, tag: str | None, source: HFSource, label: str
) -> Iterator[Document]:
    columns = getattr(dataset, "column_names", None)
    if columns is not None and source.text_field not in columns:
        raise DataError(
            f"{label}: missing text field {source.text_field!r} (columns: {', '.join(columns)}; "
            "set source.text_field)"
        )
    count = 0
    limit = source.max_documents
    for batch in dataset.iter(batch_size=_HF_BATCH_ROWS):
        if source.text_field not in batch:
            raise DataError(f"{label}: missing text field {source.text_field!r}")
        for text in batch[source.text_field]:
            if limit is not None and count >= limit:
                return
            if not isinstance(text, str):
                if text is None:
                    continue
                raise DataError(
                    f"{label}: text field {source.text_field!r} holds {type(text).__name__}, "
                    "expected strings"
                )
            if text:
                count += 1
                yield Document(text, tag, label)
