"""End-to-end `prepare_data` on a tiny multi-domain corpus in every supported format."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hdee.config import parse_config
from hdee.data.packing import Encoder, batch_by_key
from hdee.data.prepare import prepare_data
from hdee.data.tokenizer import load_tokenizer
from hdee.data.tokens import load_tokens, read_manifest
from hdee.layout import SPLITS, RunLayout

WORDS = (
    "the of law court theorem proof energy particle cat naïve café 日本語 résumé {x} -> 42".split()
)


def make_docs(seed: int, count: int, words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))
        + ("\n\nSecond paragraph." if i % 3 == 0 else "")
        for i in range(count)
    ]


def write_corpus(root: Path) -> dict[str, list[str]]:
    """general: a directory of .txt and .md; law: jsonl; math: json list of strings;
    physics: parquet via a glob; bio: json list of records. Returns each corpus's documents."""
    docs = {
        "general": make_docs(0, 12),
        "law": make_docs(1, 10),
        "math": make_docs(2, 10),
        "physics": make_docs(3, 10),
        "bio": make_docs(4, 10),
    }
    gen = root / "general" / "sub"
    gen.mkdir(parents=True)
    for i, text in enumerate(docs["general"]):
        suffix = ".md" if i % 2 else ".txt"
        (gen / f"doc{i:02d}{suffix}").write_text(text, encoding="utf-8")
    (root / "general" / "ignored.bin").write_bytes(b"\xff\xfe not text")
    with open(root / "law.jsonl", "w", encoding="utf-8") as handle:
        for text in docs["law"]:
            handle.write(json.dumps({"id": 1, "text": text}) + "\n")
        handle.write("\n")  # blank lines are fine
    (root / "math.json").write_text(json.dumps(docs["math"]), encoding="utf-8")
    (root / "phys").mkdir()
    pq.write_table(pa.table({"body": docs["physics"][:6]}), root / "phys" / "a.parquet")
    pq.write_table(pa.table({"body": docs["physics"][6:]}), root / "phys" / "b.parquet")
    (root / "bio.json").write_text(
        json.dumps([{"content": t} for t in docs["bio"]]), encoding="utf-8"
    )
    return docs


def local(name: str, *paths: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": {"type": "local", "paths": list(paths), **extra}}


def make_config(root: Path, **data: Any):
    return parse_config(make_raw(**data), base_dir=root)


def make_raw(**data: Any) -> dict[str, Any]:
    return {
        "run_dir": "run",
        "seed": 0,
        "data": {
            "seq_len": 16,
            "tokenizer": {"vocab_size": 300},
            "general": local("general", "general"),
            "domains": [
                local("law", "law.jsonl"),
                local("math", "math.json"),
                local("physics", "phys/*.parquet", text_field="body"),
                local("bio", "bio.json", text_field="content"),
            ],
            **data,
        },
    }


def split_documents(tokens: np.ndarray, eos: int, tokenizer: Any) -> list[str]:
    ends = np.flatnonzero(np.asarray(tokens) == eos)
    assert ends.size and ends[-1] == len(tokens) - 1, "every document ends with EOS"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [
        tokenizer.decode(tokens[s:e].tolist(), clean_up_tokenization_spaces=False)
        for s, e in zip(starts, ends, strict=True)
    ]


def statuses(summary: dict[str, Any]) -> dict[str, str]:
    return {name: info["status"] for name, info in summary["corpora"].items()}


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, list[str]]:
    return write_corpus(tmp_path)


def test_prepare_writes_every_corpus_and_tokens_decode_back(tmp_path: Path, corpus):
    config = make_config(tmp_path)
    summary = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    layout = RunLayout.of(config.run_dir)
    tokenizer = load_tokenizer(layout.tokenizer)
    eos = tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(eos) == "<|endoftext|>"
    assert set(summary["corpora"]) == set(corpus)
    for name, docs in corpus.items():
        assert summary["corpora"][name]["status"] == "rebuilt"
        seen: list[str] = []
        for split in SPLITS:
            bin_path = layout.tokens(name, split)
            manifest = read_manifest(bin_path)
            tokens = load_tokens(bin_path)
            assert manifest["dtype"] == "uint16" and tokens.dtype == np.uint16
            assert manifest["num_tokens"] == len(tokens) >= config.data.seq_len + 1
            assert manifest["vocab_size"] == len(tokenizer)
            assert manifest["eos_token_id"] == eos
            assert manifest["tokenizer_id"] == summary["tokenizer"]["id"]
            assert len(manifest["content_hash"]) == 64
            assert len(manifest["source_fingerprint"]) == 16
            decoded = split_documents(tokens, eos, tokenizer)
            assert manifest["num_documents"] == len(decoded) >= 1
            # The text's fingerprint: each document's bytes and a NUL, in the split's order.
            text = b"".join(doc.encode("utf-8") + b"\0" for doc in decoded)
            assert manifest["text_sha256"] == hashlib.sha256(text).hexdigest()
            assert summary["corpora"][name]["splits"][split] == {
                "tokens": len(tokens),
                "documents": len(decoded),
            }
            seen.extend(decoded)
        # Every document exactly once, in one split, byte-for-byte.
        assert sorted(seen) == sorted(docs)
    # 80/10/10 of 10 documents is exactly 8/1/1.
    assert [summary["corpora"]["law"]["splits"][s]["documents"] for s in SPLITS] == [8, 1, 1]
    assert not list(Path(config.run_dir).rglob("*.tmp"))


def _mtimes(run: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (run / "data").rglob("*") if p.is_file()}


def test_prepare_is_idempotent_and_rebuilds_only_what_changed(tmp_path: Path, corpus):
    config = make_config(tmp_path)
    first = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    run = Path(config.run_dir)
    before = _mtimes(run)

    second = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    assert set(statuses(second).values()) == {"skipped"}
    assert second["tokenizer"]["rebuilt"] is False
    assert second["corpora"] == {
        name: {**info, "status": "skipped"} for name, info in first["corpora"].items()
    }
    assert _mtimes(run) == before  # no file rewritten

    # Touching one domain's file rebuilds that domain only. The BPE is retrained on the same
    # text, comes out identical, so its id and every other corpus stay valid.
    law = tmp_path / "law.jsonl"
    os.utime(law, ns=(law.stat().st_atime_ns, law.stat().st_mtime_ns + 10**9))
    third = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    assert statuses(third) == {
        "general": "skipped",
        "law": "rebuilt",
        "math": "skipped",
        "physics": "skipped",
        "bio": "skipped",
    }
    assert third["tokenizer"]["id"] == first["tokenizer"]["id"]
    after = _mtimes(run)
    changed = {p for p in after if after[p] != before.get(p)}
    assert changed and all("/law/" in p or "/tokenizer/" in p for p in changed)


def test_changed_tokenizer_rebuilds_everything(tmp_path: Path, corpus):
    original = make_config(tmp_path)
    first = prepare_data(original, RunLayout.of(original.run_dir), progress=False)
    before = read_manifest(RunLayout.of(original.run_dir).tokens("math", "train"))
    config = make_config(tmp_path, tokenizer={"vocab_size": 320})
    second = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    assert second["tokenizer"]["rebuilt"] is True
    assert second["tokenizer"]["id"] != first["tokenizer"]["id"]
    assert set(statuses(second).values()) == {"rebuilt"}
    manifest = read_manifest(RunLayout.of(config.run_dir).tokens("math", "train"))
    assert manifest["tokenizer_id"] == second["tokenizer"]["id"]
    # Other tokens, the same text: the text fingerprint does not depend on the tokenizer.
    assert manifest["content_hash"] != before["content_hash"]
    assert manifest["text_sha256"] == before["text_sha256"]


def test_pretrained_tokenizer_and_changed_domain_content(tmp_path: Path, corpus):
    # Train once, then use that directory as a "pretrained" tokenizer for a second run.
    bpe_config = make_config(tmp_path)
    prepare_data(bpe_config, RunLayout.of(bpe_config.run_dir), progress=False)
    pretrained = str(RunLayout.of(bpe_config.run_dir).tokenizer)
    raw_tokenizer = {"kind": "pretrained", "name_or_path": pretrained}
    config = parse_config(
        {
            **bpe_config.to_dict(),
            "run_dir": str(tmp_path / "run2"),
            "data": {**bpe_config.to_dict()["data"], "tokenizer": raw_tokenizer},
        },
        base_dir=tmp_path,
    )
    first = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    assert set(statuses(first).values()) == {"rebuilt"}
    # A domain whose content changes is rebuilt, alone, with the new text.
    new_docs = make_docs(99, 10)
    (tmp_path / "math.json").write_text(json.dumps(new_docs), encoding="utf-8")
    second = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    assert [n for n, s in statuses(second).items() if s == "rebuilt"] == ["math"]
    layout = RunLayout.of(config.run_dir)
    tokenizer = load_tokenizer(layout.tokenizer)
    decoded = [
        doc
        for split in SPLITS
        for doc in split_documents(load_tokens(layout.tokens("math", split)), 0, tokenizer)
    ]
    assert sorted(decoded) == sorted(new_docs)


def test_max_documents_and_split_override(tmp_path: Path, corpus):
    config = make_config(
        tmp_path,
        domains=[
            local("law", "law.jsonl", max_documents=5),
            {**local("math", "math.json"), "split": {"train": 0.6, "validation": 0.2, "test": 0.2}},
        ],
    )
    summary = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    docs = lambda name: [summary["corpora"][name]["splits"][s]["documents"] for s in SPLITS]  # noqa: E731
    assert docs("law") == [3, 1, 1]
    assert docs("math") == [6, 2, 2]


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def test_hf_datasets_local_directory_keeps_its_own_splits(tmp_path: Path, corpus):
    pytest.importorskip("datasets")
    own = {"train": make_docs(10, 7), "validation": make_docs(11, 3), "test": make_docs(12, 2)}
    for split, texts in own.items():
        _write_jsonl(tmp_path / "hfds" / f"{split}.jsonl", texts)
    single = make_docs(13, 10)
    _write_jsonl(tmp_path / "hfsingle" / "data.jsonl", single)
    config = make_config(
        tmp_path,
        domains=[
            {"name": "hf", "source": {"type": "hf", "path": str(tmp_path / "hfds")}},
            {"name": "hf1", "source": {"type": "hf", "path": str(tmp_path / "hfsingle")}},
        ],
    )
    summary = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    layout = RunLayout.of(config.run_dir)
    tokenizer = load_tokenizer(layout.tokenizer)
    for split, texts in own.items():
        decoded = split_documents(load_tokens(layout.tokens("hf", split)), 0, tokenizer)
        assert decoded == texts  # the dataset's own split, in its order
    # A dataset with one split is split by hdee like any local corpus.
    assert [summary["corpora"]["hf1"]["splits"][s]["documents"] for s in SPLITS] == [8, 1, 1]


def test_hf_datasets_save_to_disk_directory(tmp_path: Path, corpus):
    datasets = pytest.importorskip("datasets")
    texts = make_docs(20, 10)
    datasets.Dataset.from_dict({"body": texts, "n": list(range(10))}).save_to_disk(
        str(tmp_path / "saved")
    )
    config = make_config(
        tmp_path,
        domains=[
            {
                "name": "saved",
                "source": {
                    "type": "hf",
                    "path": str(tmp_path / "saved"),
                    "text_field": "body",
                    "max_documents": 9,
                },
            }
        ],
    )
    summary = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    assert sum(v["documents"] for v in summary["corpora"]["saved"]["splits"].values()) == 9


def test_worker_pool_gives_the_same_tokens_as_one_process(tmp_path: Path, corpus):
    config = make_config(tmp_path)
    prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    tokdir = RunLayout.of(config.run_dir).tokenizer
    items = [("a" if i % 3 else "b", text) for i, text in enumerate(make_docs(5, 60))]

    def run(workers: int) -> dict[str, np.ndarray]:
        out: dict[str, list[np.ndarray]] = {"a": [], "b": []}
        with Encoder(tokdir, 0, num_workers=workers, pool_min_chars=0) as encoder:
            for key, ids, _ in encoder.encode_stream(batch_by_key(items, batch_chars=500)):
                out[key].append(ids)
            used_pool = encoder._pool is not None
        assert used_pool == (workers > 1)
        return {k: np.concatenate(v) for k, v in out.items()}

    single, pooled = run(1), run(2)
    assert all(np.array_equal(single[k], pooled[k]) for k in single)


def test_workers_start_up_front_only_when_the_expected_input_pays_for_them(tmp_path: Path, corpus):
    config = make_config(tmp_path)
    prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    tokdir = RunLayout.of(config.run_dir).tokenizer
    with Encoder(tokdir, 0, num_workers=2, pool_min_chars=1000, expected_chars=999) as encoder:
        assert encoder._pool is None
    with Encoder(tokdir, 0, num_workers=2, pool_min_chars=1000, expected_chars=1000) as encoder:
        assert encoder._pool is not None
        items = [("a", text) for text in make_docs(3, 10)]
        batches = list(encoder.encode_stream(batch_by_key(items, batch_chars=100)))
        assert sum(n for _, _, n in batches) == 10


def test_compressed_files_read_the_same_documents(tmp_path: Path):
    import gzip

    import zstandard

    from hdee.config import LocalSource
    from hdee.data.sources import iter_documents

    docs = make_docs(11, 12)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    plain = tmp_path / "plain"
    packed = tmp_path / "packed"
    plain.mkdir()
    (packed / "nested").mkdir(parents=True)
    (plain / "a.jsonl").write_bytes(lines)
    (plain / "b.json").write_text(json.dumps(docs[:3]), encoding="utf-8")
    (plain / "c.txt").write_text(docs[4], encoding="utf-8")
    (packed / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (packed / "b.json.zst").write_bytes(
        zstandard.ZstdCompressor().compress(json.dumps(docs[:3]).encode())
    )
    (packed / "nested" / "c.txt.gz").write_bytes(gzip.compress(docs[4].encode()))

    def texts(root: Path) -> list[str]:
        corpus = parse_config(
            {
                "run_dir": str(tmp_path / "run"),
                "data": {
                    "general": {"name": "g", "source": {"type": "local", "paths": [str(root)]}},
                    "domains": [{"name": "d", "source": {"type": "local", "paths": [str(root)]}}],
                },
            }
        ).data.general
        assert isinstance(corpus.source, LocalSource)
        return [doc.text for doc in iter_documents(corpus)]

    assert texts(packed) == texts(plain) == docs + docs[:3] + [docs[4]]


def test_hf_data_files_are_read_relative_to_the_config_and_fingerprinted(tmp_path: Path, corpus):
    pytest.importorskip("datasets")
    own = {"train": make_docs(20, 6), "validation": make_docs(21, 2), "test": make_docs(22, 2)}
    for split, texts in own.items():
        _write_jsonl(tmp_path / "files" / f"{split}.jsonl", texts)
    source = {
        "type": "hf",
        "path": "json",  # the datasets library's packaged builder: no hub needed
        "data_files": {split: f"files/{split}.jsonl" for split in own},
    }
    config = make_config(tmp_path, domains=[{"name": "jsonfiles", "source": source}])
    summary = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    documents = {s: summary["corpora"]["jsonfiles"]["splits"][s]["documents"] for s in SPLITS}
    assert documents == {split: len(texts) for split, texts in own.items()}
    assert (
        statuses(prepare_data(config, RunLayout.of(config.run_dir), progress=False))["jsonfiles"]
        == "skipped"
    )
    _write_jsonl(tmp_path / "files" / "test.jsonl", make_docs(23, 3))  # a data file changed
    summary = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
    assert statuses(summary)["jsonfiles"] == "rebuilt"
    assert summary["corpora"]["jsonfiles"]["splits"]["test"]["documents"] == 3


def test_hf_revision_and_data_files_reach_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from hdee.data.sources import iter_documents

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def fake_load_dataset(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return datasets.Dataset.from_dict({"text": ["one document"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = {
        "type": "hf",
        "path": "someone/corpus",
        "split": "train",
        "revision": "abc123",
        "data_files": "en/part-*.json.gz",  # repo-relative: must stay as written
    }
    config = parse_config(
        {
            "run_dir": "run",
            "data": {
                "general": {"name": "g", "source": source},
                "domains": [{"name": "d", "source": source}],
            },
        },
        base_dir=Path("/nonexistent-base"),
    )
    assert [doc.text for doc in iter_documents(config.data.general)] == ["one document"]
    args, kwargs = calls[0]
    assert args[0] == "someone/corpus"
    assert kwargs["revision"] == "abc123"
    assert kwargs["data_files"] == "en/part-*.json.gz"


def test_hdee_prepare_ends_with_documents_and_tokens_per_corpus_and_split(
    tmp_path: Path, corpus, capsys
):
    import yaml

    from hdee.cli import main

    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(yaml.safe_dump(make_raw()))
    layout = RunLayout.of(tmp_path / "run")

    def table() -> dict[str, list[str]]:
        # Piped (not a terminal): plain rows, "corpus status train docs train tokens ...".
        lines = capsys.readouterr().out.splitlines()
        header = lines.index(next(line for line in lines if line.startswith("corpus ")))
        assert lines[header].split() == ["corpus", "status"] + [
            word for split in SPLITS for word in (split, "docs", split, "tokens")
        ]
        return {line.split()[0]: line.split()[1:] for line in lines[header + 1 :]}

    assert main(["prepare", str(config_path), "--quiet"]) == 0
    rows = table()
    assert list(rows) == [*corpus, "total"]
    totals = [0] * 6
    for name in corpus:
        status, *counts = rows[name]
        assert status == "rebuilt"
        expected = []
        for split in SPLITS:
            manifest = read_manifest(layout.tokens(name, split))
            expected += [manifest["num_documents"], manifest["num_tokens"]]
        assert [int(c.replace(",", "")) for c in counts] == expected
        totals = [t + e for t, e in zip(totals, expected, strict=True)]
    assert [int(c.replace(",", "")) for c in rows["total"]] == totals
    assert totals[0] + totals[2] + totals[4] == sum(len(docs) for docs in corpus.values())

    assert main(["prepare", str(config_path), "--quiet"]) == 0
    again = table()
    assert {name: row[0] for name, row in again.items() if name != "total"} == dict.fromkeys(
        corpus, "skipped"
    )
    assert again["total"] == rows["total"]
