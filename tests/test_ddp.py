"""Two-process DDP on CPU (gloo) through the real entry point, `python -m hdee.train SPEC`.

The two ranks are started the way torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment), without torchrun's own launcher process: that
saves a torch import, a third of this test's time on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hdee.train import TrainSpec
from train_helpers import tiny_spec


@pytest.mark.slow  # still seconds; runs in the default suite
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: autocast over fp32 masters
def test_two_process_ddp_run_completes_and_only_rank0_writes(
    tmp_path: Path, precision: str
) -> None:
    spec = tiny_spec(
        tmp_path, "ddp", steps=6, eval_every=3, checkpoint_every=3, precision=precision
    )
    outputs = _launch_two_ranks(spec, tmp_path / "spec.json")
    assert ("cpu, bf16 autocast" in outputs[0]) is (precision == "bf16")
    out = Path(spec.output_dir)
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["tokens"] == 6 * 4 * 16 * 2  # each rank reads its own batch every step
    # Every line of every file written once: a second writer would duplicate log lines.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    val_steps = [r["step"] for r in rows if "val/val/loss" in r]
    assert train_steps == [1, 6] and val_steps == [3, 6]
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "final", "metrics.jsonl", "result.json", "spec.json", "tensorboard",
    ]  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0000003", "step_0000006",
    ]  # fmt: skip
    assert len(list((out / "tensorboard").iterdir())) == 1  # one event file: one writer
    # The banner and the result come from rank 0 only.
    assert outputs[0].count("job ->") == 1 and "[hdee.train]" not in outputs[1]
    assert '"world_size": 2' in outputs[0] and '"world_size"' not in outputs[1]


def _launch_two_ranks(spec: TrainSpec, spec_path: Path) -> list[str]:
    """Run `python -m hdee.train SPEC` as ranks 0 and 1; returns each rank's output."""
    spec_path.write_text(spec.model_dump_json())
    port = _free_port()
    ranks = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        command = [sys.executable, "-m", "hdee.train", str(spec_path)]
        ranks.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    for process in ranks:
        try:
            outputs.append(process.communicate(timeout=240)[0])
        finally:
            if process.poll() is None:
                process.kill()
    for process, output in zip(ranks, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    return outputs


@pytest.mark.slow
def test_chunked_loss_under_ddp_trains_like_the_plain_loss(tmp_path: Path) -> None:
    """The fused, chunked LM-head loss sits inside the DDP wrapper: gradients are still
    averaged over ranks whatever the chunk, so an automatic chunk and chunks of 10 positions
    end at the same weights (to float rounding)."""
    # fp32: the tolerance below is float32 rounding (bf16 would round each chunk its own way).
    settings = {"steps": 6, "eval_every": 6, "checkpoint_every": 6, "precision": "fp32"}
    plain = tiny_spec(tmp_path, "plain", **settings)
    chunked = tiny_spec(tmp_path, "chunked", loss_chunk_tokens=10, **settings)
    _launch_two_ranks(plain, tmp_path / "plain.json")
    _launch_two_ranks(chunked, tmp_path / "chunked.json")
    a = load_file(str(Path(plain.output_dir) / "final" / "model.safetensors"))
    b = load_file(str(Path(chunked.output_dir) / "final" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
