"""Without the Hugging Face hub, a hub tokenizer or dataset fails in seconds with one clear
message, instead of a minute of retried requests. Nothing here reaches the network: the hub
endpoint is pointed at a closed local port, and loaders must not even try it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config_dict
from hdee.cli import main
from hdee.config import Corpus
from hdee.data import DataError
from hdee.data.sources import iter_documents
from hdee.data.tokenizer import load_pretrained

UNREACHABLE = "the hub cannot be reached (cannot connect to http://127.0.0.1:9"


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) on the loopback is closed: the probe is refused at once.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def test_a_hub_tokenizer_without_the_hub_fails_fast(no_hub):
    began = time.monotonic()
    with pytest.raises(DataError) as error:
        load_pretrained("hdee-tests/no-such-tokenizer")
    assert time.monotonic() - began < 20  # retries with back-off take about a minute
    message = str(error.value)
    assert message.startswith("tokenizer 'hdee-tests/no-such-tokenizer': not in the local")
    assert UNREACHABLE in message


def test_offline_mode_is_named_as_the_reason(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hub cannot be reached \(HF_HUB_OFFLINE is set\)"):
        load_pretrained("hdee-tests/no-such-tokenizer")


def test_a_missing_local_tokenizer_path_is_not_blamed_on_the_hub(no_hub, tmp_path: Path):
    with pytest.raises(DataError, match="nope'?: no such file or directory"):
        load_pretrained(str(tmp_path / "nope"))


def test_a_hub_dataset_without_the_hub_fails_fast(no_hub):
    corpus = Corpus.model_validate(
        {"name": "web", "source": {"type": "hf", "path": "hdee-tests/no-such-dataset"}}
    )
    began = time.monotonic()
    with pytest.raises(DataError) as error:
        list(iter_documents(corpus))
    assert time.monotonic() - began < 20
    message = str(error.value)
    assert message.startswith("corpus 'web': dataset 'hdee-tests/no-such-dataset': not in the")
    assert UNREACHABLE in message


def test_a_packaged_builder_over_local_files_needs_no_hub(no_hub, tmp_path: Path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    corpus = Corpus.model_validate(
        {
            "name": "local",
            "source": {"type": "hf", "path": "json", "data_files": str(tmp_path / "a.jsonl")},
        }
    )
    assert [doc.text for doc in iter_documents(corpus)] == ["one", "two"]


def test_hdee_plan_with_a_hub_tokenizer_and_no_hub_says_what_to_do(no_hub, tmp_path, capsys):
    raw = tiny_config_dict(tmp_path / "run")
    raw["data"]["tokenizer"] = {"kind": "pretrained", "name_or_path": "hdee-tests/no-such-tok"}
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    began = time.monotonic()
    assert main(["plan", str(config_path)]) == 1
    assert time.monotonic() - began < 20
    err = capsys.readouterr().err
    assert UNREACHABLE in err and "--vocab-size" in err
