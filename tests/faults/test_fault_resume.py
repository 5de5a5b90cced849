"""Kill `hdee run` for real (SIGKILL: no cleanup) inside prepare, seed training, expert
training and evaluation, re-run the same command each time: the models and results are
byte-identical to the shared run made without interruption (conftest.tiny_cli_run).

Kill mid-job of a single training job: tests/test_train.py::test_sigkill_mid_run_then_rerun_
equals_uninterrupted; SIGTERM of a pool: tests/test_pipeline.py.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from hdee.layout import RunLayout
from hdee.records import Plan


def _marker(pattern: str) -> Callable[[RunLayout], bool]:
    return lambda layout: any(layout.root.glob(pattern))


# Where to kill, in the order the run reaches them: a file that exists only once the stage is
# under way (and before it ends, for the training stages: a job's first checkpoint).
KILL_POINTS = {
    "prepare": _marker("data/tokenizer/tokenizer.json"),
    "seeds": _marker("jobs/seed-*/checkpoints/step_*"),
    "experts": _marker("jobs/expert-*/checkpoints/step_*"),
    "evaluate": _marker("evaluation/logprobs/*/*.safetensors"),
}


def _outputs(layout: RunLayout) -> dict[str, bytes]:
    """What must not depend on interruptions: every model's weights, the plan, the difficulty
    ranking and the evaluation results (result.json holds wall-clock seconds: left out)."""
    files = [layout.plan, layout.difficulty_record, layout.results]
    for job_id in Plan.read(layout.plan).jobs:
        files.append(layout.job(job_id).final / "model.safetensors")
    return {str(path.relative_to(layout.root)): path.read_bytes() for path in files}


def test_sigkill_in_every_stage_then_resume_gives_identical_models_and_results(
    tiny_cli_run: dict, tmp_path: Path
) -> None:
    raw = yaml.safe_load(tiny_cli_run["config_path"].read_text())
    raw["run_dir"] = str(tmp_path / "run")
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(raw))
    layout = RunLayout.of(tmp_path / "run")
    command = [
        sys.executable,
        "-m",
        "hdee.cli",
        "run",
        str(config),
        "--quiet",
        "--until",
        "evaluate",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the arithmetic of the shared run (1 thread)
    landed = []
    for stage, reached in KILL_POINTS.items():
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 180
        while not reached(layout) and process.poll() is None:
            assert time.monotonic() < deadline, f"the run did not reach {stage} in 180 s"
            time.sleep(0.005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            landed.append(stage)
        process.wait()
        process.stderr.close()
    # Tiny stages can end between two polls; the training stages (a checkpoint half way
    # through 12-step seeds) and evaluation are long enough to be hit.
    assert {"seeds", "evaluate"} <= set(landed), landed
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr
    expected = _outputs(RunLayout.of(tiny_cli_run["run_dir"]))
    got = _outputs(layout)
    assert got.keys() == expected.keys()
    assert [name for name in expected if got[name] != expected[name]] == []


class _Planted:
    """Unpickling this runs code: the marker file appears if a loader ever unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_a_planted_pickle_is_never_loaded(tmp_path: Path, where: str) -> None:
    """hdee loads safetensors only: a pytorch_model.bin (a pickle that would run code) planted
    beside or instead of the weights is never unpickled."""
    from hdee.checkpoint import checkpoint_dirs
    from hdee.layout import JobLayout
    from hdee.model import load_model
    from hdee.scoring import load_expert
    from hdee.train import run_training
    from train_helpers import tiny_spec

    marker = tmp_path / "pwned"
    spec = tiny_spec(tmp_path, steps=8, checkpoint_every=4)
    job = JobLayout(Path(spec.output_dir))
    assert run_training(spec, progress=False, stop_after=4) is None
    if where == "checkpoint":
        (latest,) = checkpoint_dirs(job)
        (latest / "model.safetensors").unlink()
        with open(latest / "pytorch_model.bin", "wb") as handle:
            pickle.dump({"weights": _Planted(marker)}, handle)
        with pytest.raises(ValueError, match="model.safetensors"):
            load_model(latest)
        result = run_training(spec, progress=False)  # skips it, starts over, never unpickles
        assert result is not None
    else:
        result = run_training(spec, progress=False)
        assert result is not None
        with open(job.final / "pytorch_model.bin", "wb") as handle:
            pickle.dump({"weights": _Planted(marker)}, handle)
        (job.final / "model.safetensors").unlink()
        with pytest.raises(ValueError, match="model.safetensors"):
            load_model(job.final)
        with pytest.raises(ValueError, match="model.safetensors"):
            load_expert(job.final, torch.device("cpu"))
    assert not marker.exists(), "a planted pickle was unpickled"
