"""Throughput of `hdee prepare` against a reference-style pipeline, on the same text and tokenizer.

(a) hdee: `prepare_data` (vectorised byte-level BPE encoder, worker processes, one flat .bin
    per split).
(b) reference style (what the public HDEE code does): `tokenizer(doc)` one document at a time,
    packed into seq_len chunks, one parquet row per `ParquetWriter.write_table` call.
Both use the same tokenizer, trained beforehand; the ids hdee's encoder gives are checked equal
to the reference's on the first documents.

Text: --text-dir (its .jsonl files, records with "text"), or generated: documents made of random
runs of lines from this machine's Python standard library sources (real, varied text, not one
string repeated), or with --multilingual, sentences of Zipf-distributed words in five scripts
(Latin with accents, Cyrillic, Greek, CJK, Arabic: non-ASCII text). The reference path is timed
on the first --ref-mb MB only (it is slow; MB/s is per MB either way); pass --ref-mb 0 to run it
on everything.

    python benchmarks/bench_prepare.py --mb 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hdee.config import parse_config
from hdee.data.packing import Encoder
from hdee.data.prepare import prepare_data
from hdee.data.tokenizer import load_pretrained, load_tokenizer, save_tokenizer, train_bpe
from hdee.layout import RunLayout
from machine import print_machine

MB = 1_000_000


def stdlib_lines() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            lines.extend(path.read_text(encoding="utf-8").splitlines())
        except (UnicodeDecodeError, OSError):
            continue
    return [line for line in lines if line.strip()]


def generate(out_dir: Path, total_mb: float, files: int = 8, seed: int = 0) -> None:
    """Write about `total_mb` MB of jsonl documents of 1-8 KB each into `files` files."""
    rng = random.Random(seed)
    lines = stdlib_lines()
    budget = int(total_mb * MB)
    per_file = budget // files + 1
    out_dir.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        written = 0
        with open(out_dir / f"part{index:02d}.jsonl", "w", encoding="utf-8") as handle:
            while written < per_file:
                parts = []
                for _ in range(rng.randint(2, 12)):
                    start = rng.randrange(len(lines) - 20)
                    parts.append("\n".join(lines[start : start + rng.randint(3, 20)]))
                record = json.dumps({"text": "\n\n".join(parts)}) + "\n"
                handle.write(record)
                written += len(record.encode("utf-8"))


SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyzéèàçñüöäß",
    "cyrillic": "абвгдежзийклмнопрстуфхцчшщыэюя",
    "greek": "αβγδεζηθικλμνξοπρστυφχψω",
    "cjk": "".join(chr(c) for c in range(0x4E00, 0x4E00 + 800)),
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
}


def generate_multilingual(out_dir: Path, total_mb: float, files: int = 8, seed: int = 0) -> None:
    """About `total_mb` MB (UTF-8) of jsonl documents of Zipf-distributed words in five scripts."""
    rng = random.Random(seed)
    vocabulary = [
        "".join(rng.choice(chars) for _ in range(rng.randint(1, 4 if name == "cjk" else 10)))
        for name, chars in SCRIPTS.items()
        for _ in range(4000)
    ]
    rng.shuffle(vocabulary)
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    per_file = int(total_mb * MB) // files + 1
    out_dir.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        written = 0
        with open(out_dir / f"part{index:02d}.jsonl", "w", encoding="utf-8") as handle:
            while written < per_file:
                sentences = [
                    " ".join(rng.choices(vocabulary, weights, k=rng.randint(5, 30))) + "."
                    for _ in range(rng.randint(10, 60))
                ]
                record = json.dumps({"text": " ".join(sentences)}, ensure_ascii=False) + "\n"
                handle.write(record)
                written += len(record.encode("utf-8"))


def iter_texts(files: list[Path], max_bytes: int | None = None) -> Iterator[str]:
    used = 0
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                text = json.loads(line)["text"]
                used += len(text.encode("utf-8"))
                yield text
                if max_bytes is not None and used >= max_bytes:
                    return


def text_bytes(files: list[Path], max_bytes: int | None = None) -> int:
    return sum(len(t.encode("utf-8")) for t in iter_texts(files, max_bytes))


def reference(
    files: list[Path], tokenizer_dir: Path, seq_len: int, out: Path, max_bytes: int | None
) -> None:
    """One document at a time, one parquet row per write (the public reference's pattern)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.eos_token_id
    schema = pa.schema([("input_ids", pa.list_(pa.int32()))])
    buffer: list[int] = []
    with pq.ParquetWriter(out, schema) as writer:
        for text in iter_texts(files, max_bytes):
            buffer.extend(tokenizer(text)["input_ids"])
            buffer.append(eos)
            while len(buffer) >= seq_len:
                chunk, buffer = buffer[:seq_len], buffer[seq_len:]
                writer.write_table(pa.table({"input_ids": [chunk]}, schema=schema))


def check_same_ids(files: list[Path], tokenizer_dir: Path, check_bytes: int = 2 * MB) -> None:
    """hdee's encoder must give the reference's ids, document for document (EOS after each)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = list(iter_texts(files, check_bytes))
    with Encoder(tokenizer_dir, tokenizer.eos_token_id, num_workers=1) as encoder:
        ours = np.concatenate([ids for _, ids, _ in encoder.encode_stream([(0, texts)])])
    reference_ids: list[int] = []
    for text in texts:
        reference_ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    if not np.array_equal(ours, np.array(reference_ids, dtype=np.uint32)):
        raise SystemExit("hdee's ids differ from the reference's: the comparison is void")
    print(f"ids identical to the reference's on the first {len(texts):,} documents")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200, help="MB of text to generate")
    parser.add_argument("--text-dir", type=Path, help="use these .jsonl files instead")
    parser.add_argument("--multilingual", action="store_true", help="generate non-ASCII text")
    parser.add_argument("--ref-mb", type=float, default=20, help="MB for the reference (0: all)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers (0: all cores)")
    args = parser.parse_args()
    print_machine()

    with tempfile.TemporaryDirectory(prefix="hdee-bench-") as tmp_name:
        tmp = Path(tmp_name)
        text_dir = args.text_dir
        if text_dir is None:
            text_dir = tmp / "text"
            started = time.perf_counter()
            (generate_multilingual if args.multilingual else generate)(text_dir, args.mb)
            print(f"generated {args.mb:g} MB in {time.perf_counter() - started:.1f} s")
        files = sorted(text_dir.glob("*.jsonl"))
        if len(files) < 2:
            raise SystemExit(f"{text_dir}: need at least two .jsonl files")
        total = text_bytes(files)

        # One tokenizer for both paths, trained outside the timings.
        tokenizer_dir = tmp / "tokenizer"
        tokenizer = train_bpe(iter_texts(files), args.vocab_size, max_bytes=20 * MB)
        save_tokenizer(tokenizer, tokenizer_dir, {"kind": "bench"})
        # Importing transformers (about 2 s, once per process) is start-up, not throughput:
        # done here, outside both timings, as the reference would have it done before its loop.
        load_pretrained(str(tokenizer_dir))

        config = parse_config(
            {
                "run_dir": str(tmp / "run"),
                "data": {
                    "seq_len": args.seq_len,
                    "num_workers": args.workers,
                    "tokenizer": {"kind": "pretrained", "name_or_path": str(tokenizer_dir)},
                    "general": {
                        "name": "general",
                        "source": {"type": "local", "paths": [str(f) for f in files[:-1]]},
                    },
                    "domains": [
                        {"name": "domain", "source": {"type": "local", "paths": [str(files[-1])]}}
                    ],
                },
            }
        )
        check_same_ids(files, tokenizer_dir)

        started = time.perf_counter()
        summary = prepare_data(config, RunLayout.of(config.run_dir), progress=False)
        ours_s = time.perf_counter() - started
        tokens = sum(s["tokens"] for c in summary["corpora"].values() for s in c["splits"].values())
        ours = total / MB / ours_s
        print(
            f"hdee prepare: {total / MB:.1f} MB, {tokens:,} tokens in {ours_s:.1f} s "
            f"= {ours:.1f} MB/s"
        )

        ref_bytes = None if args.ref_mb <= 0 else int(args.ref_mb * MB)
        ref_total = text_bytes(files, ref_bytes)
        started = time.perf_counter()
        reference(files, tokenizer_dir, args.seq_len, tmp / "ref.parquet", ref_bytes)
        ref_s = time.perf_counter() - started
        ref = ref_total / MB / ref_s
        print(f"reference:    {ref_total / MB:.1f} MB in {ref_s:.1f} s = {ref:.2f} MB/s")
        print(
            f"speed-up: {ours / ref:.1f}x  (cores: {os.cpu_count()}, "
            f"seq_len {args.seq_len}, vocab {len(tokenizer)})"
        )
        assert np.isfinite(ours)


if __name__ == "__main__":
    main()
