"""benchmarks/gpu_check.py on the CPU: its arguments, its refusal without CUDA, and a dry run
(tiny model, a few steps) that goes through the same training and evaluation code and prints
the one summary table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # for its `machine` import, as when run
    spec = importlib.util.spec_from_file_location("gpu_check", BENCHMARKS / "gpu_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_paper_m_model(gpu_check: ModuleType):
    args = gpu_check.parse_args([])
    assert args.shape == gpu_check.PAPER_M
    assert (args.shape.hidden, args.shape.layers, args.shape.heads) == (768, 12, 12)
    assert (args.shape.ffn, args.shape.seq_len) == (3072, 1024)
    assert args.shape.vocab >= 128_000
    assert args.compile and args.steps == 40
    dry = gpu_check.parse_args(["--dry-run"])
    assert dry.shape == gpu_check.DRY_RUN and not dry.compile and dry.steps == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "expected a number >= 1, got 0"),
        (["--steps", "ten"], "expected a whole number, got 'ten'"),
        (["--steps", "1"], "--steps must be >= 2"),
        (["--peak-tflops", "-5"], "expected a finite number > 0, got -5"),
        (["--peak-tflops", "nan"], "expected a finite number > 0, got nan"),
        (["--batch"], "expected one argument"),
        (["--route-tokens", "1024"], "--route-tokens must be below the sequence length 1024"),
        (["--route-experts", "4"], "--route-experts must be at most 3"),
    ],
)
def test_bad_arguments_are_named(gpu_check: ModuleType, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda_unless_dry_run(gpu_check: ModuleType, capsys, monkeypatch):
    def must_not_run(*args: object) -> None:
        raise AssertionError("measured the M model without CUDA instead of refusing")

    monkeypatch.setattr(gpu_check, "measure_training", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err


def test_dry_run_prints_the_summary_table(gpu_check: ModuleType, capsys, tmp_path: Path):
    out_json = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--dry-run", "--steps", "3", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN" in out and "machine: CPU" in out
    results = json.loads(out_json.read_text())
    for row in (
        "training tokens/s",
        "training MFU",
        "evaluation, full ensemble",
        "evaluation, routed",
    ):
        assert row in results and results[row] in out
    # Real measurements: positive tokens/s, and an MFU with its peak's source.
    assert float(results["training tokens/s"].split()[0].replace(",", "")) > 0
    assert "measured matmul peak" in results["training MFU"]
    assert float(results["evaluation, full ensemble"].split()[0].replace(",", "")) > 0
    assert "3 members" in results["evaluation, full ensemble"]
    # Routed evaluation ran hdee's routed scorer: top-1 of 3 after the prefix, and its speed
    # against the same scorer running every member.
    routed = results["evaluation, routed"]
    assert float(routed.split()[0].replace(",", "")) > 0
    assert "1.00 of 3 members per window after a 32-token prefix" in routed
    assert "x the same scorer running all members" in routed


def test_mfu_uses_the_nominal_peak_of_known_gpus(gpu_check: ModuleType, monkeypatch):
    args = gpu_check.parse_args([])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert gpu_check.peak_tflops(args, torch.device("cuda"), 123.0) == (
        756.0,
        "nominal H100 PCIe dense bf16",
    )
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert gpu_check.peak_tflops(args, torch.device("cuda"), 123.0)[0] == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    assert gpu_check.peak_tflops(args, torch.device("cuda"), 123.0) == (
        123.0,
        "measured matmul peak",
    )
    override = gpu_check.parse_args(["--peak-tflops", "500"])
    assert gpu_check.peak_tflops(override, torch.device("cuda"), 123.0) == (500.0, "--peak-tflops")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_shell_script_refuses_without_cuda():
    completed = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "no CUDA device visible" in completed.stderr and "--dry-run" in completed.stderr
    assert "pytest -m gpu" not in completed.stdout  # refused before running anything
