"""Job identity: a job is what determines its weights. Cadence and device may change between
runs of the same job; anything that changes the weights makes another job (plan ids:
tests/test_plan.py::test_job_ids_hash_what_determines_the_weights_and_nothing_else)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hdee.atomic import read_json
from hdee.layout import JobLayout
from hdee.train import run_training
from train_helpers import tiny_spec


def test_a_job_resumes_with_a_changed_cadence_and_still_refuses_changed_weights(
    tmp_path: Path,
) -> None:
    """Cadence is not part of what a job is: resuming with other eval/checkpoint settings
    continues the job (spec.json records the new ones), while a changed learning rate is a
    different job."""
    first = tiny_spec(tmp_path, steps=12, checkpoint_every=4, eval_every=6)
    assert run_training(first, progress=False, stop_after=8) is None
    resumed = tiny_spec(
        tmp_path, steps=12, checkpoint_every=3, eval_every=4, eval_batches=1, keep_checkpoints=1
    )
    result = run_training(resumed, progress=False)
    assert result is not None and result.steps == 12
    assert read_json(JobLayout(Path(resumed.output_dir)).spec)["training"]["checkpoint_every"] == 3
    other = tiny_spec(tmp_path, "other", steps=12)
    assert run_training(other, progress=False, stop_after=4) is None
    with pytest.raises(ValueError, match="holds a different job"):
        run_training(tiny_spec(tmp_path, "other", steps=12, lr=1e-3), progress=False)
