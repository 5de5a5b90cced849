"""Domain discovery at scale: `hdee discover` against a reference-style clusterer, on planted
domains, with `hdee prepare`'s tokenisation of the same text as the yardstick.

(a) hdee: `hdee discover CONFIG` (tf-idf -> TruncatedSVD(100) -> L2 -> balanced k-means fitted
    on a 10,000-document sample, every document then assigned in a streamed pass and tokenized
    into its cluster's split files). Prepared once beforehand (the BPE), outside the timings.
(b) reference style (c-BTM's released code, and what one writes first): load every document
    into a list, fit the same TfidfVectorizer, TruncatedSVD(100) and normalisation on all of
    them, scikit-learn KMeans on all of them, pickle the fitted objects.
(c) `hdee prepare` of the same corpus as one domain, with the same tokenizer: the tokenisation
    a discovery pass should stay within 2x of.

Each runs in its own subprocess (so its peak RSS is its own: `wait4`'s ru_maxrss, the largest
process of its tree), in interleaved rounds. The corpus: --sizes MB of jsonl documents (300 to
1,000 words) from 8 planted topics, each with its own 2,000 made-up words (Zipf-weighted),
mixed with a general vocabulary every topic shares and English function words; the topic is
the document's directory, so both sides report their adjusted Rand index against it.

    python benchmarks/bench_discover.py                      # 20 MB and 100 MB, ~5 minutes
    python benchmarks/bench_discover.py --sizes 100,1000     # the issue's sizes (~30 minutes
                                                             # on 2 cores; 3.5 GB of disk)

Goals (issue 22): hdee's peak RSS independent of corpus size once the sample is fitted, >= 5x
lower than the reference at 1 GB, ARI equal or better, documents/s within 2x of prepare's.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from machine import print_machine

MB = 1_000_000
TOPICS = 8
FILE_MB = 16


def made_up_words(rng: np.random.Generator, count: int, letters: str) -> list[str]:
    vowels = "aeiou"
    words = set()
    while len(words) < count:
        syllables = rng.integers(2, 5)
        words.add(
            "".join(
                letters[rng.integers(len(letters))] + vowels[rng.integers(5)]
                for _ in range(syllables)
            )
        )
    return sorted(words)


def generate(out_dir: Path, total_mb: float, seed: int = 0) -> tuple[int, int]:
    """About `total_mb` MB of planted-topic documents as out_dir/topic<k>/part<i>.jsonl;
    returns (documents, bytes)."""
    rng = np.random.default_rng(seed)
    consonants = "bcdfghjklmnpqrstvwxz"
    shared = made_up_words(rng, 5000, consonants)
    function = "the a of to and in is it that was for on are with as by at from this be".split()
    topics = [made_up_words(rng, 2000, consonants) for _ in range(TOPICS)]

    def zipf(n: int) -> np.ndarray:
        weights = 1.0 / np.arange(1, n + 1)
        return weights / weights.sum()

    documents = written = 0
    per_topic = int(total_mb * MB) // TOPICS + 1
    for topic, vocabulary in enumerate(topics):
        words = np.array(vocabulary + shared + function)
        # 45% the topic's words, 35% the shared vocabulary, 20% function words.
        p = np.concatenate(
            [0.45 * zipf(len(vocabulary)), 0.35 * zipf(len(shared)), 0.2 * zipf(len(function))]
        )
        directory = out_dir / f"topic{topic}"
        directory.mkdir(parents=True, exist_ok=True)
        done, part = 0, 0
        handle = open(directory / f"part{part:03d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        while done < per_topic:
            lengths = rng.integers(300, 1001, size=64)
            draws = rng.choice(len(words), size=int(lengths.sum()), p=p)
            for text in np.split(words[draws], np.cumsum(lengths)[:-1]):
                record = json.dumps({"text": " ".join(text.tolist()) + "."}) + "\n"
                handle.write(record)
                done += len(record)
                documents += 1
                if done >= per_topic:
                    break
            if handle.tell() >= FILE_MB * MB:
                handle.close()
                part += 1
                handle = open(directory / f"part{part:03d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        handle.close()
        written += done
    return documents, written


# ----------------------------------------------------------------------------------------------
# The three contestants, each a subprocess


def reference(corpus: Path, out: Path, sample_seed: int = 0) -> None:
    """Load everything, fit everything, pickle it (run in a subprocess: --role reference)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.metrics import adjusted_rand_score
    from sklearn.preprocessing import normalize

    from hdee.config import DiscoverConfig
    from hdee.discover import tfidf_vectorizer

    started = time.perf_counter()
    texts, labels = [], []
    for path in sorted(corpus.rglob("*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                texts.append(json.loads(line)["text"])
                labels.append(path.parent.name)
    vectorizer = tfidf_vectorizer(DiscoverConfig(corpus="x", clusters=TOPICS))  # hdee's settings
    tfidf = vectorizer.fit_transform(texts)
    svd = TruncatedSVD(n_components=100, random_state=sample_seed)
    features = normalize(svd.fit_transform(tfidf))
    kmeans = KMeans(n_clusters=TOPICS, n_init=3, random_state=sample_seed).fit(features)
    with open(out / "clusterer.pkl", "wb") as handle:
        pickle.dump({"tfidf": vectorizer, "svd": svd, "kmeans": kmeans}, handle)
    seconds = time.perf_counter() - started
    result = {
        "documents": len(texts),
        "seconds": seconds,
        "ari": adjusted_rand_score(labels, kmeans.labels_),
    }
    (out / "reference.json").write_text(json.dumps(result))


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the largest process of its tree) of a command."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    errors = process.stderr.read().decode() if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{errors[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def configs(tmp: Path, corpus: Path) -> tuple[Path, Path]:
    general = tmp / "general"
    general.mkdir(exist_ok=True)
    for i in range(30):
        (general / f"g{i}.txt").write_text("the cat sat on the mat and it was good. " * 40)
    base = {
        "data": {
            "seq_len": 1024,
            "tokenizer": {"kind": "bpe", "vocab_size": 8192, "train_max_bytes": 20 * MB},
            "general": {"name": "general", "source": {"type": "local", "paths": [str(general)]}},
        },
        "model": {"preset": "tiny"},
        "plan": {"iterations": 2},
    }
    discover = {
        **base,
        "run_dir": str(tmp / "hdee"),
        "data": {
            **base["data"],
            "discover": {
                "corpus": {"name": "corpus", "source": {"type": "local", "paths": [str(corpus)]}},
                "clusters": TOPICS,
                "labels": "directory",
            },
        },
    }
    prepare = {
        **base,
        "run_dir": str(tmp / "prepare"),
        "data": {
            **base["data"],
            "tokenizer": {
                "kind": "pretrained",
                "name_or_path": str(tmp / "hdee" / "data" / "tokenizer"),
            },
            "domains": [{"name": "corpus", "source": {"type": "local", "paths": [str(corpus)]}}],
        },
    }
    paths = (tmp / "discover.yaml", tmp / "prepare.yaml")
    for path, raw in zip(paths, (discover, prepare), strict=True):
        path.write_text(yaml.safe_dump(raw))
    return paths


def measure_size(size_mb: float, rounds: int, work: Path, env: dict[str, str]) -> dict[str, dict]:
    tmp = Path(tempfile.mkdtemp(prefix=f"discover-{size_mb:g}MB-", dir=work))
    try:
        corpus = tmp / "corpus"
        started = time.perf_counter()
        documents, size = generate(corpus, size_mb)
        print(
            f"\n{size / MB:,.0f} MB: {documents:,} documents of {TOPICS} planted topics, generated in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        discover_yaml, prepare_yaml = configs(tmp, corpus)
        hdee = [sys.executable, "-m", "hdee.cli"]
        subprocess.run(
            [*hdee, "prepare", str(discover_yaml), "--quiet"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        runs: dict[str, list[dict]] = {"hdee discover": [], "reference": [], "hdee prepare": []}
        for round_ in range(rounds):
            shutil.rmtree(tmp / "hdee" / "discovery", ignore_errors=True)
            for stale in (tmp / "hdee" / "data").glob("cluster-*"):
                shutil.rmtree(stale)
            seconds, rss = run_measured([*hdee, "discover", str(discover_yaml), "--quiet"], env)
            record = json.loads((tmp / "hdee" / "discovery" / "discovery.json").read_text())
            runs["hdee discover"].append(
                {
                    "seconds": seconds,
                    "rss": rss,
                    "ari": record["agreement"]["adjusted_rand_index"],
                    "phases": record["seconds"],
                }
            )
            out = tmp / f"reference-{round_}"
            out.mkdir()
            seconds, rss = run_measured(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    "reference",
                    "--corpus",
                    str(corpus),
                    "--out",
                    str(out),
                ],
                env,
            )
            result = json.loads((out / "reference.json").read_text())
            runs["reference"].append({"seconds": seconds, "rss": rss, "ari": result["ari"]})
            shutil.rmtree(tmp / "prepare" / "data" / "corpus", ignore_errors=True)
            seconds, rss = run_measured([*hdee, "prepare", str(prepare_yaml), "--quiet"], env)
            runs["hdee prepare"].append({"seconds": seconds, "rss": rss, "ari": None})
            print(
                f"  round {round_ + 1}: "
                + ", ".join(
                    f"{name} {r[-1]['seconds']:.0f} s / {r[-1]['rss']:,.0f} MB"
                    for name, r in runs.items()
                ),
                flush=True,
            )
        return {"documents": documents, "bytes": size, "runs": runs}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict[float, dict]) -> None:
    print("\n| corpus | system | documents/s | MB/s | peak RSS (MB) | ARI vs planted topics |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for result in results.values():
        for name, runs in result["runs"].items():
            seconds = min(r["seconds"] for r in runs)  # the best round: the machine is shared
            rss = max(r["rss"] for r in runs)
            aris = {round(r["ari"], 4) for r in runs if r["ari"] is not None}
            ari = ", ".join(f"{a:.4f}" for a in sorted(aris)) or "–"
            print(
                f"| {result['bytes'] / MB:,.0f} MB | {name} | {result['documents'] / seconds:,.0f} | {result['bytes'] / MB / seconds:.2f} | {rss:,.0f} | {ari} |"
            )
    print()
    sizes = sorted(results)
    for size in sizes:
        runs = results[size]["runs"]
        best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
        rss = {name: max(r["rss"] for r in rs) for name, rs in runs.items()}
        ari = {
            name: min(r["ari"] for r in rs) for name, rs in runs.items() if name != "hdee prepare"
        }
        phases = runs["hdee discover"][0]["phases"]
        print(
            f"{results[size]['bytes'] / MB:,.0f} MB: reference / hdee peak RSS {rss['reference'] / rss['hdee discover']:.1f}x (goal at 1 GB: >= 5x); "
            f"ARI hdee {ari['hdee discover']:.4f} vs reference {ari['reference']:.4f} (goal: equal or better); "
            f"hdee discover runs at {best['hdee prepare'] / best['hdee discover']:.2f}x the documents/s of hdee prepare (goal: >= 0.5x); "
            f"hdee phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
        )
    if len(sizes) > 1:
        low, high = (
            max(r["rss"] for r in results[s]["runs"]["hdee discover"])
            for s in (sizes[0], sizes[-1])
        )
        print(
            f"hdee discover peak RSS at {results[sizes[-1]]['bytes'] / MB:,.0f} MB / at {results[sizes[0]]['bytes'] / MB:,.0f} MB: {high / low:.2f}x (goal: ~1, independent of corpus size)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20,100", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per size")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where the corpora go (default: a temp dir)"
    )
    parser.add_argument(
        "--role", choices=["bench", "reference"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "reference":
        reference(args.corpus, args.out)
        return
    print_machine()
    sizes = [float(s) for s in args.sizes.split(",")]
    work = args.work_dir or Path(tempfile.gettempdir())
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / MB
    if free < 3.5 * max(sizes):
        raise SystemExit(
            f"{work}: {free:,.0f} MB free, the {max(sizes):g} MB corpus needs about {3.5 * max(sizes):,.0f}"
        )
    src = Path(__file__).resolve().parents[1] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
        "HDEE_PROGRESS": "0",
    }
    results = {size: measure_size(size, args.rounds, work, env) for size in sizes}
    report(results)


if __name__ == "__main__":
    main()
