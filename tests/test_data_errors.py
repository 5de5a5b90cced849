"""Bad input gives a DataError naming the corpus and the file, and leaves nothing half-written."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hdee.config import parse_config
from hdee.data import DataError
from hdee.data.prepare import prepare_data
from hdee.layout import RunLayout

GOOD = " ".join(f"word{i % 37} text {i}" for i in range(200))


def write_good(root: Path) -> None:
    (root / "good").mkdir()
    for i in range(6):
        (root / "good" / f"{i}.txt").write_text(f"{i} {GOOD}", encoding="utf-8")


def config_with(root: Path, bad: dict[str, Any], seq_len: int = 16):
    raw = {
        "run_dir": "run",
        "data": {
            "seq_len": seq_len,
            "tokenizer": {"vocab_size": 300},
            "general": {"name": "general", "source": {"type": "local", "paths": ["good"]}},
            "domains": [{"name": "baddomain", "source": {"type": "local", **bad}}],
        },
    }
    return parse_config(raw, base_dir=root)


def jsonl(path: Path, records: list[Any]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _empty(root: Path) -> dict[str, Any]:
    (root / "empty").mkdir()
    (root / "empty" / "a.txt").write_text("", encoding="utf-8")
    (root / "empty" / "b.txt").write_text("", encoding="utf-8")
    return {"paths": ["empty"]}


def _too_few_documents(root: Path) -> dict[str, Any]:
    jsonl(root / "two.jsonl", [{"text": GOOD}, {"text": GOOD}])
    return {"paths": ["two.jsonl"]}


def _invalid_utf8(root: Path) -> dict[str, Any]:
    (root / "bad").mkdir()
    (root / "bad" / "ok.txt").write_text(GOOD, encoding="utf-8")
    (root / "bad" / "broken.txt").write_bytes(b"fine text \xc3\x28 more")
    return {"paths": ["bad/*.txt"]}


def _invalid_utf8_jsonl(root: Path) -> dict[str, Any]:
    line = json.dumps({"text": GOOD}).encode() + b"\n"
    (root / "broken.jsonl").write_bytes(line * 3 + b'{"text": "ab\xff"}\n')
    return {"paths": ["broken.jsonl"]}


def _missing_field_jsonl(root: Path) -> dict[str, Any]:
    jsonl(root / "fields.jsonl", [{"text": GOOD}] * 4 + [{"body": GOOD}])
    return {"paths": ["fields.jsonl"]}


def _missing_field_parquet(root: Path) -> dict[str, Any]:
    pq.write_table(pa.table({"body": [GOOD] * 5}), root / "fields.parquet")
    return {"paths": ["fields.parquet"]}


def _corrupt_parquet(root: Path) -> dict[str, Any]:
    (root / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet")
    return {"paths": ["corrupt.parquet"]}


def _truncated_gzip(root: Path) -> dict[str, Any]:
    packed = gzip.compress("".join(json.dumps({"text": GOOD}) + "\n" for _ in range(50)).encode())
    (root / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    return {"paths": ["cut.jsonl.gz"]}


def _not_gzip(root: Path) -> dict[str, Any]:
    (root / "plain.txt.gz").write_text(GOOD, encoding="utf-8")  # named .gz, not compressed
    return {"paths": ["plain.txt.gz"]}


def _corrupt_zstd(root: Path) -> dict[str, Any]:
    (root / "noise.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"not a zstd frame" * 8)
    return {"paths": ["noise.jsonl.zst"]}


def _compressed_parquet(root: Path) -> dict[str, Any]:
    (root / "table.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    return {"paths": ["table.parquet.gz"]}


def _missing_path(root: Path) -> dict[str, Any]:
    return {"paths": ["nowhere/missing.jsonl"]}


def _glob_matches_nothing(root: Path) -> dict[str, Any]:
    return {"paths": ["texts/*.md"]}


CASES: dict[str, tuple[Callable[[Path], dict[str, Any]], str, str]] = {
    # name: (make the bad source, file named in the message, what the message says)
    "empty corpus": (_empty, "empty", "no documents"),
    "too few documents for the splits": (_too_few_documents, "two.jsonl", "too small"),
    "invalid utf-8 txt": (_invalid_utf8, "broken.txt", "invalid UTF-8 at byte offset 10"),
    "invalid utf-8 jsonl": (_invalid_utf8_jsonl, "broken.jsonl", "byte offset"),
    "missing text field jsonl": (_missing_field_jsonl, "fields.jsonl", "line 5: missing text"),
    "missing text field parquet": (_missing_field_parquet, "fields.parquet", "missing text"),
    "corrupt parquet": (_corrupt_parquet, "corrupt.parquet", "parquet"),
    "truncated gzip": (_truncated_gzip, "cut.jsonl.gz", "unreadable compressed file"),
    "not really gzip": (_not_gzip, "plain.txt.gz", "unreadable compressed file"),
    "corrupt zstd": (_corrupt_zstd, "noise.jsonl.zst", "unreadable compressed file"),
    "compressed parquet": (_compressed_parquet, "table.parquet.gz", "compressed parquet"),
    "missing path": (_missing_path, "nowhere/missing.jsonl", "does not exist"),
    "glob matches nothing": (_glob_matches_nothing, "texts/*.md", "matches no files"),
}


def assert_nothing_half_written(run: Path, corpus: str = "baddomain") -> None:
    assert not list(run.rglob("*.tmp")), "temporary files left behind"
    assert not list(run.rglob(".*")), "hidden temporary files or directories left behind"
    assert not (RunLayout.of(run).corpus(corpus)).exists()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_data_error_naming_corpus_and_file(tmp_path: Path, case: str):
    make, filename, says = CASES[case]
    write_good(tmp_path)
    config = config_with(tmp_path, make(tmp_path))
    with pytest.raises(DataError) as info:
        prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    message = str(info.value)
    assert "baddomain" in message
    assert filename in message
    assert says in message
    assert isinstance(info.value, ValueError)
    assert_nothing_half_written(Path(config.run_dir))


def test_domain_too_small_for_one_sequence(tmp_path: Path):
    write_good(tmp_path)
    jsonl(tmp_path / "short.jsonl", [{"text": f"tiny {i}"} for i in range(10)])
    config = config_with(tmp_path, {"paths": ["short.jsonl"]}, seq_len=64)
    with pytest.raises(DataError, match=r"baddomain.*short\.jsonl.*seq_len \+ 1 = 65"):
        prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    # The general corpus was fine and is complete; the bad domain left nothing.
    assert RunLayout.of(config.run_dir).manifest("general", "test").is_file()
    assert_nothing_half_written(Path(config.run_dir))


def test_a_failed_rebuild_keeps_the_previous_complete_files(tmp_path: Path):
    write_good(tmp_path)
    jsonl(tmp_path / "dom.jsonl", [{"text": f"{i} {GOOD}"} for i in range(5)])
    config = config_with(tmp_path, {"paths": ["dom.jsonl"]})
    prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    layout = RunLayout.of(config.run_dir)
    before = layout.tokens("baddomain", "train").read_bytes()
    # Make the domain invalid after the tokenizer pass could have read it.
    jsonl(tmp_path / "dom.jsonl", [{"text": f"{i} {GOOD}"} for i in range(5)] + [{"x": 1}])
    with pytest.raises(DataError, match="dom.jsonl"):
        prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    assert layout.tokens("baddomain", "train").read_bytes() == before
    assert layout.manifest("baddomain", "train").is_file()
    assert not list(Path(config.run_dir).rglob("*.tmp"))


def test_zst_without_zstandard_says_what_to_install(tmp_path: Path, monkeypatch):
    import sys

    import zstandard

    write_good(tmp_path)
    line = json.dumps({"text": GOOD}) + "\n"
    (tmp_path / "docs.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(line.encode() * 20)
    )
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if it were not installed
    config = config_with(tmp_path, {"paths": ["docs.jsonl.zst"]})
    with pytest.raises(DataError, match=r"baddomain.*docs\.jsonl\.zst.*pip install zstandard"):
        prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    assert_nothing_half_written(Path(config.run_dir))
