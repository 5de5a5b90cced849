"""A local source can cut its files into documents (split_documents), so one big text file
per domain is a usable domain: paragraphs between blank lines, or chunks cut at line ends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hdee.config import ConfigError, Corpus, ExperimentConfig, parse_config
from hdee.data import DataError
from hdee.data.prepare import prepare_data
from hdee.data.sources import chunks, iter_documents, paragraphs
from hdee.data.tokens import read_manifest
from hdee.layout import RunLayout


def corpus(path: Path, **source: object) -> Corpus:
    return Corpus.model_validate(
        {"name": "book", "source": {"type": "local", "paths": [str(path)], **source}}
    )


def test_paragraphs_are_the_runs_between_blank_lines():
    text = "one\nstill one\n\n\ntwo\n  \t\nthree  \n\n"
    assert paragraphs(text) == ["one\nstill one", "two", "three"]


def test_chunks_end_at_line_ends_and_keep_every_character():
    lines = [f"line {i} " + "x" * (1 + i % 7) + "\n" for i in range(200)]
    text = "".join(lines)
    pieces = chunks(text, 100)
    assert len(pieces) > 10
    for piece in pieces[:-1]:
        assert 60 <= len(piece) <= 100  # about the size asked, never more
    # Every piece is whole lines: joined back, nothing is lost or cut inside a line.
    assert "\n".join(pieces).split("\n") == [line.rstrip("\n") for line in lines]


def test_a_line_longer_than_a_chunk_is_cut_at_spaces():
    text = " ".join(f"w{i}" for i in range(300))  # one line of about 1500 characters
    pieces = chunks(text, 100)
    assert all(len(piece) <= 100 for piece in pieces)
    assert " ".join(pieces).split() == text.split()


def test_split_documents_applies_to_every_file(tmp_path: Path):
    (tmp_path / "a.txt").write_text("alpha\n\nbeta\n\ngamma\n")
    (tmp_path / "b.txt").write_text("delta\n\nepsilon\n")
    texts = [doc.text for doc in iter_documents(corpus(tmp_path, split_documents="paragraphs"))]
    assert texts == ["alpha", "beta", "gamma", "delta", "epsilon"]
    whole = [doc.text for doc in iter_documents(corpus(tmp_path))]
    assert len(whole) == 2  # the default stays one document per file
    limited = corpus(tmp_path, split_documents="paragraphs", max_documents=4)
    assert len(list(iter_documents(limited))) == 4  # the cap counts documents after cutting


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"split_documents": "chars"}, "split_documents 'chars' needs chunk_chars"),
        ({"split_documents": "paragraphs", "chunk_chars": 500}, "chunk_chars is only used with"),
        ({"split_documents": "chars", "chunk_chars": 10}, "chunk_chars"),
        ({"split_documents": "pages"}, "split_documents"),
    ],
)
def test_bad_chunking_settings_name_the_key(tmp_path: Path, source, expected):
    raw = {
        "run_dir": str(tmp_path / "run"),
        "data": {
            "general": {"name": "g", "source": {"type": "local", "paths": ["g"], **source}},
            "domains": [{"name": "a", "source": {"type": "local", "paths": ["a"]}}],
        },
    }
    with pytest.raises(ConfigError, match=expected) as error:
        parse_config(raw, "exp.yaml")
    assert "data.general.source" in str(error.value)


def big_text(seed: int, paragraphs_count: int = 40) -> str:
    rng = np.random.default_rng(seed)
    words = ["the", "river", "stone", "light", "north", "quiet", "field", "iron", "glass"]
    return "\n\n".join(
        "\n".join(" ".join(rng.choice(words, 12)) for _ in range(3))
        for _ in range(paragraphs_count)
    )


def test_one_big_text_file_per_domain_prepares(tmp_path: Path):
    for name in ("general", "a", "b"):
        (tmp_path / f"{name}.txt").write_text(big_text(len(name)), encoding="utf-8")

    def raw(**source: object) -> dict:
        def local(name: str) -> dict:
            return {
                "name": name,
                "source": {"type": "local", "paths": [str(tmp_path / f"{name}.txt")], **source},
            }

        return {
            "run_dir": str(tmp_path / "run"),
            "data": {
                "seq_len": 16,
                "tokenizer": {"vocab_size": 300},
                "num_workers": 1,
                "general": local("general"),
                "domains": [local("a"), local("b")],
            },
        }

    with pytest.raises(DataError, match="set the source's split_documents"):
        prepare(parse_config(raw()))
    prepare(parse_config(raw(split_documents="paragraphs")))
    layout = RunLayout.of(tmp_path / "run")
    documents = {
        split: read_manifest(layout.tokens("a", split))["num_documents"]
        for split in ("train", "validation", "test")
    }
    assert sum(documents.values()) == 40 and min(documents.values()) >= 1
    prepare(parse_config(raw(split_documents="chars", chunk_chars=400)))
    # About 3 x 12 short words per paragraph: 400-character chunks hold a couple of them.
    assert 10 < read_manifest(layout.tokens("a", "train"))["num_documents"] < 40


def prepare(config: ExperimentConfig) -> dict:
    return prepare_data(config, RunLayout.of(config.run_dir), progress=False)
