"""CUDA paths: bf16 autocast over fp32 master weights, evaluation on the GPU.

Skipped without CUDA (CI has none); run them on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hdee.atomic import read_json
from hdee.model import load_model
from hdee.scoring import label_log_probs
from hdee.train import run_training
from train_helpers import tiny_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_autocast_keeps_fp32_master_weights_and_learns(tmp_path: Path):
    spec = tiny_spec(tmp_path, steps=30, device="cuda", precision="bf16")
    result = run_training(spec, progress=False)
    lines = (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()
    rows = [row for row in map(json.loads, lines) if "loss" in row]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    model = load_model(tmp_path / "job" / "final")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert read_json(tmp_path / "job" / "result.json")["steps"] == result.steps == 30


def test_label_log_probs_agree_on_cpu_and_cuda(tmp_path: Path):
    spec = tiny_spec(tmp_path, steps=4, device="cpu")
    run_training(spec, progress=False)
    model = load_model(tmp_path / "job" / "final").eval()
    batch = torch.randint(0, model.config.vocab_size, (2, 17))
    on_cpu = label_log_probs(model, batch)
    on_cuda = label_log_probs(model.to("cuda"), batch.to("cuda")).cpu()
    torch.testing.assert_close(on_cuda, on_cpu, atol=1e-4, rtol=1e-4)
