"""Weights changed after training are never turned into a number: result.json records the
sha256 of final/model.safetensors and every reader checks it (hdee.integrity)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fault_helpers import an_expert, copy_run, hdee
from safetensors import safe_open

from hdee.layout import RunLayout
from hdee.model import WEIGHTS_NAME
from hdee.records import JobResult, Plan


def _flip_a_byte(path: Path) -> None:
    """Change one byte inside the tensor data: the file stays the same size and loadable."""
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def run(tiny_cli_run: dict, tmp_path: Path) -> RunLayout:
    return copy_run(tiny_cli_run["run_dir"], tmp_path / "run")


def test_every_finished_job_records_the_sha256_of_its_weights(run: RunLayout) -> None:
    plan = Plan.read(run.plan)
    for job_id in plan.jobs:
        job = run.job(job_id)
        recorded = JobResult.read(job.result).weights_sha256
        actual = hashlib.sha256((job.final / WEIGHTS_NAME).read_bytes()).hexdigest()
        assert recorded == actual, job_id


def test_the_log_prob_cache_is_keyed_by_the_weights(run: RunLayout) -> None:
    job_id = an_expert(run)
    recorded = JobResult.read(run.job(job_id).result).weights_sha256
    caches = list((run.evaluation / "logprobs" / job_id).glob("*.safetensors"))
    assert caches
    for path in caches:
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata()["weights_sha256"] == recorded


def test_a_flipped_byte_in_an_expert_stops_evaluate_and_generate(run: RunLayout) -> None:
    weights = run.job(an_expert(run)).final / WEIGHTS_NAME
    _flip_a_byte(weights)
    results_before = run.results.read_bytes()
    code, _, err = hdee("evaluate", str(run.root), "--quiet")
    assert code != 0
    assert str(weights) in err and "sha256" in err
    assert run.results.read_bytes() == results_before  # no number came from the changed file
    code, out, err = hdee(
        "generate", str(run.root), "--configuration", "MHo-IHo", "--prompt", "the"
    )
    assert code != 0 and out == ""
    assert str(weights) in err


def test_a_truncated_expert_is_caught_though_its_log_probs_are_cached(run: RunLayout) -> None:
    weights = run.job(an_expert(run)).final / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = hdee("evaluate", str(run.root), "--quiet")
    assert code != 0
    assert str(weights) in err


def test_an_expert_does_not_branch_from_a_changed_parent(run: RunLayout) -> None:
    from hdee.atomic import read_json
    from hdee.train import TrainSpec, run_training

    plan = Plan.read(run.plan)
    expert = an_expert(run)
    parent = plan.jobs[expert].init_from
    assert parent is not None
    spec = TrainSpec.model_validate(read_json(run.job(expert).spec))
    retrain = spec.model_copy(
        update={"output_dir": str(run.root / "retrain"), "init_from": str(run.job(parent).final)}
    )
    _flip_a_byte(run.job(parent).final / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=str(run.job(parent).final / WEIGHTS_NAME)):
        run_training(retrain, progress=False)
