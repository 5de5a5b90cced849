"""Shared test helpers: tiny configs built inline (litgpt style)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def tiny_config_dict(
    run_dir: Path, n_domains: int = 12, held_out: int = 3, **sections: Any
) -> dict[str, Any]:
    """A valid experiment config dict over local files that need not exist (for planning)."""
    raw: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": {
            "seq_len": 32,
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "general": {"name": "general", "source": {"type": "local", "paths": ["general"]}},
            "domains": [
                {"name": f"d{i}", "source": {"type": "local", "paths": [f"d{i}"]}}
                for i in range(n_domains)
            ],
        },
        "model": {"preset": "tiny"},
        "plan": {"held_out": [f"d{i}" for i in range(n_domains - held_out, n_domains)]},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tests use tiny models: intra-op threads cost more than the maths they split, and on a
    busy 2-core machine their spin-waiting makes a step many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def config_dict(tmp_path: Path) -> dict[str, Any]:
    return tiny_config_dict(tmp_path / "run")


WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new"
).split()


def write_tiny_corpus(root: Path, n_domains: int = 12, docs: int = 24, words: int = 60) -> Path:
    """Text files for a general corpus and `n_domains` domains of graded difficulty.

    Domain i draws words from a vocabulary of 4 + 3 * i words with a seeded generator, so
    higher-numbered domains are harder to predict (more entropy) and the seeds' perplexity
    ranks them; every domain has `docs` documents (one file each).
    """
    import random

    def write(directory: Path, vocabulary: list[str], seed: int) -> None:
        rng = random.Random(seed)
        directory.mkdir(parents=True, exist_ok=True)
        for d in range(docs):
            text = " ".join(rng.choice(vocabulary) for _ in range(words))
            (directory / f"doc{d:03d}.txt").write_text(text + ".\n", encoding="utf-8")

    write(root / "general", WORDS, seed=1000)
    for i in range(n_domains):
        write(root / f"d{i}", WORDS[: 4 + 3 * i], seed=i)
    return root


def tiny_run_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A complete tiny experiment over `write_tiny_corpus`: trains in seconds on a CPU."""
    corpus = write_tiny_corpus(tmp_path / "corpus")
    raw = tiny_config_dict(tmp_path / "run")
    raw["data"]["general"]["source"]["paths"] = [str(corpus / "general")]
    for domain in raw["data"]["domains"]:
        domain["source"]["paths"] = [str(corpus / domain["name"])]
    raw["data"]["seq_len"] = 16
    raw["data"]["num_workers"] = 1
    raw["seeds"] = {
        "training": {
            "steps": 12,
            "batch_size": 4,
            "lr": 3e-3,
            "min_lr": 3e-4,
            "warmup_steps": 2,
            "eval_every": 6,
            "eval_batches": 2,
            "checkpoint_every": 6,
        }
    }
    raw["experts"] = {
        "training": {
            "batch_size": 4,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 1,
            "eval_every": 4,
            "eval_batches": 2,
            "checkpoint_every": 4,
        }
    }
    raw["plan"]["configurations"] = [
        {
            "name": "MHo-IHo",
            "sizes": dict.fromkeys(("easy", "moderate", "difficult"), "M"),
            "steps": dict.fromkeys(("easy", "moderate", "difficult"), 4),
        },
        {
            "name": "MHo-IHe",
            "sizes": dict.fromkeys(("easy", "moderate", "difficult"), "M"),
            "steps": {"easy": 3, "moderate": 4, "difficult": 5},
        },
        {
            "name": "MHe-IHo",
            "sizes": {"easy": "S", "moderate": "M", "difficult": "L"},
            "steps": dict.fromkeys(("easy", "moderate", "difficult"), 4),
        },
    ]
    raw["plan"]["iterations"] = 2
    raw["difficulty"] = {"eval_batches": 2}
    raw["evaluation"] = {"batch_size": 4, "max_test_sequences": 8, "cached_prior_sequences": 4}
    raw["runner"] = {"workers": 1}
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.fixture(scope="session")
def tiny_cli_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small finished run made stage by stage through the `hdee` CLI, shared read-only by
    the test modules that check commands, evaluation and the report (copy it before changing
    anything). Five domains, two held out, one iteration: ten tiny jobs, seconds on a CPU.

    Returns the config path, the run directory and what each command printed (`outputs`).
    """
    import contextlib
    import io

    import yaml

    from hdee.cli import main

    tmp_path = tmp_path_factory.mktemp("cli-run")
    raw = tiny_run_config(tmp_path)
    raw["data"]["domains"] = raw["data"]["domains"][:5]
    raw["plan"]["held_out"] = ["d3", "d4"]
    raw["plan"]["iterations"] = 1
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    outputs: dict[str, str] = {}

    def hdee(name: str, *argv: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        assert code == 0, f"hdee {' '.join(argv)} exited {code}: {err.getvalue()}"
        outputs[name] = out.getvalue()
        return out.getvalue()

    hdee("prepare", "prepare", str(config_path), "--quiet")
    listing = hdee("jobs seeds", "jobs", str(config_path), "seeds")
    for line in listing.splitlines():
        hdee(f"train {line.split()[0]}", "train", line.split()[-1])
    hdee("run", "run", str(config_path), "--from", "difficulty", "--until", "experts", "--quiet")
    hdee("evaluate", "evaluate", str(run_dir), "--quiet")
    hdee("report", "report", str(run_dir))
    return {"config_path": config_path, "run_dir": run_dir, "outputs": outputs}


@pytest.fixture(scope="session")
def tiny_finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete tiny run (trained, evaluated with every method, reported), shared
    read-only by the export and tasks tests: 6 trained domains over 2 iterations, 2 held out,
    a homogeneous and a heterogeneous (S / M / L experts) configuration."""
    from hdee.config import parse_config
    from hdee.pipeline import run_experiment

    tmp_path = tmp_path_factory.mktemp("finished")
    raw = tiny_run_config(tmp_path)
    raw["data"]["domains"] = raw["data"]["domains"][:8]
    raw["plan"]["held_out"] = ["d6", "d7"]
    raw["plan"]["configurations"] = [
        c for c in raw["plan"]["configurations"] if c["name"] in ("MHo-IHo", "MHe-IHo")
    ]
    run_experiment(parse_config(raw), progress=False)
    return tmp_path / "run"


def write_planted_corpus(
    root: Path, sizes: tuple[int, ...] = (40, 40, 40, 40), words: int = 80, seed: int = 0
) -> Path:
    """Planted domains for discovery: topic k's documents (one .txt file each, in directory
    `topic<k>`) draw 60% of their words from a vocabulary of 60 made-up words of its own and
    the rest from a few English function words all topics share; `sizes[k]` documents each.
    A topic's words are made of its own five consonants (up to four topics), so the topics
    differ in characters too (byte-level tokens: what a seed model's features see), not only
    in words (what tf-idf sees). Returns the directory holding the topic directories."""
    import random

    rng = random.Random(seed)
    consonants = "bcdfghjklmnpqrstvwxz"

    def made_up_word(letters: str) -> str:
        return "".join(rng.choice(letters) + rng.choice("aeiou") for _ in range(3))

    shared = "the a of to and in is it that was for on are with as".split()
    for topic, count in enumerate(sizes):
        letters = consonants[5 * topic % 20 : 5 * topic % 20 + 5]
        vocabulary = [made_up_word(letters) for _ in range(60)]
        directory = root / f"topic{topic}"
        directory.mkdir(parents=True, exist_ok=True)
        for d in range(count):
            text = " ".join(
                rng.choice(vocabulary) if rng.random() < 0.6 else rng.choice(shared)
                for _ in range(words)
            )
            (directory / f"doc{d:03d}.txt").write_text(text + ".\n", encoding="utf-8")
    return root


def discovery_run_config(
    tmp_path: Path, clusters: int = 4, sizes: tuple[int, ...] = (40, 40, 40, 40), **discover: Any
) -> dict[str, Any]:
    """`tiny_run_config` with no configured domains: its domains are the `clusters` clusters
    that data.discover finds in a planted corpus (labels: the topic directories); one
    iteration, the last cluster held out, the homogeneous and the S / M / L configuration."""
    raw = tiny_run_config(tmp_path)
    pool = write_planted_corpus(tmp_path / "pool", sizes)
    del raw["data"]["domains"]
    raw["data"]["discover"] = {
        "corpus": {"name": "pool", "source": {"type": "local", "paths": [str(pool)]}},
        "clusters": clusters,
        "labels": "directory",
        **discover,
    }
    width = max(2, len(str(clusters - 1)))
    raw["plan"]["held_out"] = [f"cluster-{clusters - 1:0{width}d}"]
    raw["plan"]["iterations"] = 1
    raw["plan"]["configurations"] = [
        c for c in raw["plan"]["configurations"] if c["name"] in ("MHo-IHo", "MHe-IHo")
    ]
    return raw
