"""The training job: learning, schedule, resume, skip, branching, logs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hdee.config import TrainingConfig
from hdee.data.tokens import load_tokens
from hdee.model import load_model
from hdee.records import JobResult
from hdee.train import TrainSpec, evaluate, lr_at, run_training
from train_helpers import tiny_spec


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_lr_schedule() -> None:
    tc = TrainingConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, tc) == pytest.approx(1e-4)  # first warmup step: lr / warmup
    assert lr_at(9, tc) == pytest.approx(1e-3)  # end of warmup: peak
    assert lr_at(99, tc) == pytest.approx(1e-4)  # last step: exactly min_lr
    mid = lr_at(10 + 89 // 2, tc)
    assert 1e-4 < mid < 1e-3
    lrs = [lr_at(s, tc) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay
    # Each job decays over its own length: a 30-step job also ends at min_lr.
    short = TrainingConfig(steps=30, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(29, short) == pytest.approx(1e-4)
    no_warmup = TrainingConfig(steps=5, lr=1e-3, min_lr=1e-4, warmup_steps=0)
    assert lr_at(0, no_warmup) == pytest.approx(1e-3)


def test_loss_decreases_and_logs_are_written(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, steps=40, eval_every=20, checkpoint_every=20)
    result = run_training(spec, progress=False)
    out = Path(spec.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val/val/ppl" in r]
    assert train_rows[0]["step"] == 1 and train_rows[-1]["step"] == 40
    assert train_rows[-1]["loss"] < 0.6 * train_rows[0]["loss"]
    assert [r["step"] for r in val_rows] == [20, 40]
    assert val_rows[-1]["val/val/ppl"] < val_rows[0]["val/val/ppl"]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train_rows)
    assert list((out / "tensorboard").iterdir())
    assert result.steps == 40 and result.tokens == 40 * 4 * 16
    assert result.validation["val"].perplexity == pytest.approx(val_rows[-1]["val/val/ppl"])
    assert result.flops > 0 and result.final_loss == train_rows[-1]["loss"]
    assert JobResult.read(out / "result.json") == result
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "spec.json").read_text())["seed"] == 1


def test_finished_job_is_skipped(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, steps=4)
    first = run_training(spec, progress=False)
    stamp = (Path(spec.output_dir) / "final" / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert run_training(spec, progress=False) == first
    assert time.perf_counter() - start < 0.5
    assert (Path(spec.output_dir) / "final" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # auto is one of them on any CPU
def test_resume_after_interruption_is_exact(tmp_path: Path, precision: str) -> None:
    whole = tiny_spec(tmp_path, "whole", grad_accum=2, precision=precision)
    run_training(whole, progress=False)
    parts = tiny_spec(tmp_path, "parts", grad_accum=2, precision=precision)
    # Stop at step 6 as if killed: the newest checkpoint is step 4, so steps 5-6 are redone.
    assert run_training(parts, progress=False, stop_after=6) is None
    checkpoints = Path(parts.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000004"]
    assert not (Path(parts.output_dir) / "result.json").exists()
    result = run_training(parts, progress=False)
    _assert_same_weights(Path(whole.output_dir) / "final", Path(parts.output_dir) / "final")
    expected = json.loads((Path(whole.output_dir) / "result.json").read_text())
    assert result.final_loss == expected["final_loss"]
    assert result.model_dump(mode="json")["validation"] == expected["validation"]
    # The log reads like an uninterrupted one: no step logged twice.
    rows = [
        json.loads(x) for x in (Path(parts.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)) == [1, 10, 12]
    # keep_checkpoints=2: step 4 was pruned once steps 8 and 12 existed.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000008", "step_0000012"]


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path: Path, capsys) -> None:
    whole = tiny_spec(tmp_path, "whole")
    run_training(whole, progress=False)
    parts = tiny_spec(tmp_path, "parts")
    run_training(parts, progress=False, stop_after=9)
    latest = Path(parts.output_dir) / "checkpoints" / "step_0000008"
    state = latest / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    run_training(parts, progress=False)
    warning = capsys.readouterr().err
    assert "skipping unreadable checkpoint" in warning
    assert "step_0000008/trainer_state.safetensors" in warning
    _assert_same_weights(Path(whole.output_dir) / "final", Path(parts.output_dir) / "final")


def test_expert_starts_from_its_parent(tmp_path: Path) -> None:
    seed = tiny_spec(tmp_path, "seed", steps=6)
    run_training(seed, progress=False)
    parent = Path(seed.output_dir) / "final"
    # A vanishing learning rate: the expert's weights can only be the parent's.
    expert = tiny_spec(tmp_path, "expert", steps=2, lr=1e-12, min_lr=0.0, init_from=str(parent))
    assert expert.kind == "expert"
    run_training(expert, progress=False)
    got, want = _weights(Path(expert.output_dir) / "final"), _weights(parent)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-8), name
    fresh = tiny_spec(tmp_path, "fresh", steps=2, lr=1e-12, min_lr=0.0, seed=5)
    run_training(fresh, progress=False)
    emb = "model.embed_tokens.weight"
    assert not torch.allclose(_weights(Path(fresh.output_dir) / "final")[emb], want[emb])


def test_expert_needs_a_parent_and_a_matching_one(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, "seed", steps=2)
    with pytest.raises(ValueError, match="init_from"):
        TrainSpec.model_validate({**spec.model_dump(), "kind": "expert"})
    run_training(spec, progress=False)
    other = tiny_spec(tmp_path, "wrong", size="L", init_from=str(Path(spec.output_dir) / "final"))
    with pytest.raises(ValueError, match="intermediate_size"):
        run_training(other, progress=False)


def test_different_job_in_same_directory_is_refused(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, "job", steps=6)
    run_training(spec, progress=False, stop_after=4)
    changed = tiny_spec(tmp_path, "job", steps=6, lr=1e-3)
    with pytest.raises(ValueError, match="spec.json"):
        run_training(changed, progress=False)


def test_corrupt_trainer_state_json_is_reported(tmp_path: Path, capsys) -> None:
    spec = tiny_spec(tmp_path, "job", steps=8)
    run_training(spec, progress=False, stop_after=5)
    (Path(spec.output_dir) / "checkpoints" / "step_0000004" / "trainer_state.json").write_text("{")
    capsys.readouterr()
    run_training(spec, progress=False)  # no older checkpoint: starts over, still finishes
    assert "step_0000004/trainer_state.json: corrupt JSON" in capsys.readouterr().err
    assert (Path(spec.output_dir) / "result.json").exists()
    shutil.rmtree(spec.output_dir)


def test_leftovers_of_a_killed_writer_are_ignored(tmp_path: Path) -> None:
    whole = tiny_spec(tmp_path, "whole")
    run_training(whole, progress=False)
    parts = tiny_spec(tmp_path, "parts")
    run_training(parts, progress=False, stop_after=6)
    out = Path(parts.output_dir)
    # What SIGKILL in the middle of a checkpoint and of a log line leaves behind.
    partial = out / "checkpoints" / ".step_0000008.abc123.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "lo')
    run_training(parts, progress=False)
    assert not partial.exists()
    _assert_same_weights(Path(whole.output_dir) / "final", out / "final")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 10, 12]


def test_evaluate_without_a_runtime(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, "job", steps=4)
    result = run_training(spec, progress=False)
    model = load_model(Path(spec.output_dir) / "final")
    tokens = load_tokens(spec.validation["val"])
    score = evaluate(model, tokens, spec.seq_len, 4, spec.training.eval_batches)
    assert score.loss == pytest.approx(result.validation["val"].loss)
    assert score.perplexity == pytest.approx(result.validation["val"].perplexity)


def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    """A real kill (SIGKILL, no chance to clean up) at an arbitrary step, then the same command
    again: the final weights are bit-identical to a run that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys

    settings = {"steps": 400, "checkpoint_every": 4, "eval_every": 400, "keep_checkpoints": 2}
    whole = tiny_spec(tmp_path, "whole", **settings)
    run_training(whole, progress=False)

    killed = tiny_spec(tmp_path, "killed", **settings)
    spec_path = tmp_path / "killed.json"
    spec_path.write_text(killed.model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic as this process
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import torch, sys; torch.set_num_threads(1); "
            "from hdee.train import main_train; main_train(sys.argv[1])",
            str(spec_path),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = Path(killed.output_dir) / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.is_dir() and any(checkpoints.glob("step_*"))):
        assert process.poll() is None, "the training process ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (Path(killed.output_dir) / "result.json").exists(), "killed after it finished"

    run_training(killed, progress=False)
    _assert_same_weights(Path(whole.output_dir) / "final", Path(killed.output_dir) / "final")


def test_training_with_a_chunked_loss_learns(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path, steps=30, loss_chunk_tokens=16)
    run_training(spec, progress=False)
    rows = [
        json.loads(x) for x in (Path(spec.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
