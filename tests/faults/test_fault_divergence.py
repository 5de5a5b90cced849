"""Training that diverges stops at once, naming the job, step, loss and learning rate, and
leaves nothing non-finite behind (issue 14: no silent wrong answer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hdee.layout import JobLayout
from hdee.train import lr_at, run_training
from train_helpers import tiny_spec


def _all_finite_checkpoints(job: JobLayout) -> list[int]:
    steps = []
    for directory in sorted(job.checkpoints.glob("step_*")):
        weights = load_file(str(directory / "model.safetensors"))
        assert all(t.isfinite().all() for t in weights.values()), directory
        steps.append(int(directory.name.split("_")[1]))
    return steps


@pytest.mark.parametrize("grad_clip", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_a_huge_learning_rate_stops_the_job_before_anything_is_saved(
    tmp_path: Path, grad_clip: float
) -> None:
    spec = tiny_spec(
        tmp_path,
        lr=1e6,
        min_lr=1e5,
        warmup_steps=0,
        grad_clip=grad_clip,
        steps=40,
        checkpoint_every=2,
        eval_every=40,
    )
    job = JobLayout(Path(spec.output_dir))
    with pytest.raises(RuntimeError, match="diverged") as caught:
        run_training(spec, progress=False)
    message = str(caught.value)
    assert f"seed job {job.root.name} diverged at step " in message
    step = int(message.split("diverged at step ")[1].split(":")[0])
    assert 1 <= step < 40
    assert f"learning rate {lr_at(step - 1, spec.training):.6g}" in message
    assert "loss " in message and ("gradient norm " in message) == (grad_clip > 0)
    # Nothing downstream saw the non-finite values: no result, no final model, every logged
    # loss finite, every checkpoint finite and before the step that diverged.
    assert not job.result.exists() and not job.final.exists()
    for line in job.metrics.read_text().splitlines():
        row = json.loads(line)
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row
    assert all(saved < step for saved in _all_finite_checkpoints(job))


def test_a_sane_learning_rate_is_untouched(tmp_path: Path) -> None:
    result = run_training(tiny_spec(tmp_path), progress=False)
    assert result is not None and math.isfinite(result.final_loss or math.nan)
