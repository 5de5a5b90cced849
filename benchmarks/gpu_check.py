"""The GPU measurements of `benchmarks/gpu_check.sh`: training tokens/s and MFU of the paper's M
model, and evaluation tokens/s of a full ensemble, in one summary table.

Training is hdee's own job (`hdee.train.run_training`) with `precision: auto` (bf16 autocast
over fp32 master weights on a GPU), the fused, chunked LM-head + loss (`hdee.loss`) and
`compile: true`,
on random tokens: the paper's M model is hidden 768, 12 layers, 12 heads, FFN 3072, a 128K
vocabulary and 1024-token sequences. Tokens/s is steady state (the first logged step, which
holds compilation, is left out); MFU is training FLOPs per token
(`hdee.shapes.training_flops_per_token`) x tokens/s over the GPU's nominal dense bf16 peak
(`--peak-tflops`, else a table of known GPUs, else the measured matmul peak; the measured
peak is printed too). The goal is >= 40% MFU.

Evaluation is what `hdee evaluate` does per domain and split: each expert of a three-member
ensemble (FFN 2304 / 3072 / 3840, as the paper's S / M / L) scores the same windows once
(`hdee.scoring.window_log_probs`, bf16 autocast, float32 log-softmax); ensemble tokens/s is
window tokens over the time all members took. Routed evaluation (`measure_routed_eval`) runs
the live ensemble (`hdee.hf_ensemble`, scored by `hdee.inference.ensemble_label_log_probs`) with prefix routing (every member reads the first 32
tokens, then each window keeps its top-1 member) against the same scorer running every member,
batch by batch interleaved.

Without CUDA it refuses (exit 2) unless `--dry-run`, which runs the same code on a tiny model on
the CPU in seconds (what tests/test_gpu_check.py checks).

    python benchmarks/gpu_check.py [--steps 40] [--batch-size 16] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hdee.config import TrainingConfig
from hdee.data.loaders import eval_batches
from hdee.data.tokens import load_tokens, write_tokens
from hdee.hf_ensemble import HdeeEnsembleForCausalLM
from hdee.inference import ensemble_label_log_probs
from hdee.loss import auto_chunk_tokens
from hdee.model import llama_config
from hdee.scoring import inference_autocast, resolve_precision, window_log_probs
from hdee.shapes import ModelShape, training_flops_per_token
from hdee.train import TrainSpec, run_training
from machine import machine_line, matmul_peak_gflops

# Dense bf16 tensor-core peaks from the vendor's data sheets, TFLOP/s (without sparsity).
NOMINAL_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0}
MFU_GOAL = 0.40


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq_len: int
    ensemble_ffn: tuple[int, ...]


PAPER_M = Shape(768, 12, 12, 3072, 128_256, 1024, (2304, 3072, 3840))
DRY_RUN = Shape(64, 2, 4, 128, 512, 64, (96, 128, 160))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="a tiny model on the CPU, without compile, in seconds: checks the script, "
        "measures nothing worth quoting",
    )
    parser.add_argument("--steps", type=positive_int, help="training steps (default 40; 4 dry)")
    parser.add_argument("--batch-size", type=positive_int, help="sequences per step (16; 4 dry)")
    parser.add_argument(
        "--loss-chunk-tokens",
        type=positive_int,
        help="positions per chunk of the fused LM-head + loss (default: hdee's choice for "
        "the device, hdee.loss.auto_chunk_tokens)",
    )
    parser.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    parser.add_argument(
        "--eval-windows", type=positive_int, help="evaluation windows per expert (256; 8 dry)"
    )
    parser.add_argument("--eval-batch-size", type=positive_int, default=16)
    parser.add_argument(
        "--route-tokens",
        type=positive_int,
        default=32,
        help="routed evaluation: positions every member reads before the router picks",
    )
    parser.add_argument(
        "--route-experts",
        type=positive_int,
        default=1,
        help="routed evaluation: members each window keeps after routing (of 3)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=positive_float,
        help="the GPU's dense bf16 peak for MFU (default: known GPUs by name, else measured)",
    )
    parser.add_argument("--tests", default="not run", help="pytest -m gpu outcome, for the table")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    args.shape = DRY_RUN if args.dry_run else PAPER_M
    args.steps = args.steps or (4 if args.dry_run else 40)
    args.batch_size = args.batch_size or (4 if args.dry_run else 16)
    args.eval_windows = args.eval_windows or (8 if args.dry_run else 256)
    args.compile = not (args.no_compile or args.dry_run)
    if args.steps < 2:
        parser.error(f"--steps must be >= 2 (step 1 is left out of tokens/s), got {args.steps}")
    if args.route_tokens >= args.shape.seq_len:
        parser.error(
            f"--route-tokens must be below the sequence length {args.shape.seq_len}, "
            f"got {args.route_tokens}"
        )
    if args.route_experts > len(args.shape.ensemble_ffn):
        parser.error(
            f"--route-experts must be at most {len(args.shape.ensemble_ffn)} (the members), "
            f"got {args.route_experts}"
        )
    return args


def choose_device(args: argparse.Namespace) -> torch.device:
    """CUDA, or the CPU for a dry run; anything else is refused with the reason."""
    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print(
            "gpu_check.py: no CUDA device (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); run it on a GPU machine, or pass --dry-run to check the "
            "script on the CPU",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return torch.device("cuda")


def model_config(shape: Shape, ffn: int) -> LlamaConfig:
    return llama_config(
        ModelShape("gpu-check", shape.hidden, shape.layers, shape.heads, shape.heads, ffn),
        shape.vocab,
        shape.seq_len,
    )


def random_tokens(path: Path, count: int, vocab: int, seed: int) -> None:
    tokens = np.random.default_rng(seed).integers(0, vocab, size=count, dtype=np.uint32)
    write_tokens(path, tokens, {"vocab_size": vocab})


def peak_tflops(
    args: argparse.Namespace, device: torch.device, measured: float
) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from) for MFU."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        # Longest key first: "H100 PCIe" before "H100".
        for key in sorted(NOMINAL_BF16_TFLOPS, key=len, reverse=True):
            if key in name:
                return NOMINAL_BF16_TFLOPS[key], f"nominal {key} dense bf16"
    return measured, "measured matmul peak"


def measure_training(args: argparse.Namespace, device: torch.device, work: Path) -> dict[str, Any]:
    shape = args.shape
    config = model_config(shape, shape.ffn)
    tokens_needed = args.steps * args.batch_size * shape.seq_len + 1
    random_tokens(work / "train.bin", tokens_needed, shape.vocab, seed=0)
    random_tokens(work / "val.bin", 2 * args.batch_size * shape.seq_len + 1, shape.vocab, seed=1)
    output = work / "train_job"
    spec = TrainSpec(
        kind="seed",
        model=config.to_dict(),
        train_tokens=str(work / "train.bin"),
        validation={"val": str(work / "val.bin")},
        seq_len=shape.seq_len,
        training=TrainingConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            warmup_steps=2,
            eval_every=args.steps,
            eval_batches=1,
            checkpoint_every=args.steps,
            keep_checkpoints=1,
            precision="auto",
            compile=args.compile,
            loss_chunk_tokens=args.loss_chunk_tokens,
            device=str(device),
        ),
        output_dir=str(output),
    )
    started = time.perf_counter()
    result = run_training(spec, progress=False)
    wall = time.perf_counter() - started
    if result is None:
        raise RuntimeError(f"{output}: the training job stopped before its last step")
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "loss" in row]
    # The first row is step 1 alone (compilation, allocator warm-up): left out.
    steady = list(zip(train_rows, train_rows[1:], strict=False))
    seconds = sum(
        (row["tokens"] - before["tokens"]) / row["tokens_per_s"] for before, row in steady
    )
    tokens = train_rows[-1]["tokens"] - train_rows[0]["tokens"]
    peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {
        "tokens_per_s": tokens / seconds,
        "wall_s": wall,
        "flops_per_token": training_flops_per_token(config, shape.seq_len),
        "final_loss": result.final_loss,
        "loss_chunk_tokens": args.loss_chunk_tokens or auto_chunk_tokens(shape.vocab, device),
        "precision": "bf16 autocast" if resolve_precision("auto", device) else "fp32",
        "peak_memory_gib": peak_memory,
    }


def ensemble_member(shape: Shape, index: int, device: torch.device) -> LlamaForCausalLM:
    """Member `index` of the three-member ensemble (FFN `shape.ensemble_ffn[index]`), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(index)
        return LlamaForCausalLM(model_config(shape, shape.ensemble_ffn[index])).to(device).eval()


def measure_full_ensemble_eval(
    args: argparse.Namespace, device: torch.device, work: Path
) -> dict[str, Any]:
    """Every member scores every window once, as `hdee evaluate` does for one domain split."""
    shape = args.shape
    count = args.eval_windows * shape.seq_len + 1
    random_tokens(work / "eval.bin", count, shape.vocab, seed=2)
    tokens = load_tokens(work / "eval.bin")
    seconds = 0.0
    for index in range(len(shape.ensemble_ffn)):
        expert = ensemble_member(shape, index, device)
        # One warm-up batch per member (CUDA context, kernels' first launch), not timed.
        window_log_probs(expert, tokens, shape.seq_len, args.eval_batch_size, 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        window_log_probs(expert, tokens, shape.seq_len, args.eval_batch_size, args.eval_windows)
        seconds += time.perf_counter() - started  # window_log_probs ends on the CPU: synced
        del expert
    return {
        "members": len(shape.ensemble_ffn),
        "tokens_per_s": args.eval_windows * shape.seq_len / seconds,
    }


def measure_routed_eval(
    args: argparse.Namespace, device: torch.device, work: Path
) -> dict[str, Any]:
    """Routed evaluation (the live ensemble `hdee generate`, `tasks` and `export` run, with
    `routing: prefix`): every member reads the first
    `--route-tokens` of a window, then each window continues with its top `--route-experts`
    members only. Timed against the same scorer running every member on everything
    (`routing: none`), batch by batch interleaved, on the windows and experts of
    `measure_full_ensemble_eval` (random weights: the speed, not the routing quality)."""
    shape = args.shape
    tokens = load_tokens(work / "eval.bin")
    models = [ensemble_member(shape, index, device) for index in range(len(shape.ensemble_ffn))]
    batches = list(eval_batches(tokens, shape.seq_len, args.eval_batch_size, args.eval_windows))
    routed = {"mode": "prefix", "top_k": args.route_experts, "route_tokens": args.route_tokens}
    systems = {
        name: HdeeEnsembleForCausalLM.from_experts(models, routing=routing).eval()
        for name, routing in [("routed", routed), ("full", {"mode": "none"})]
    }
    seconds = dict.fromkeys(systems, 0.0)
    kept_per_window: list[float] = []
    for batch_index, batch in enumerate([batches[0], *batches]):  # the first: warm-up
        for name, ensemble in systems.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            with inference_autocast(device):
                scores = ensemble_label_log_probs(ensemble, batch)
            elapsed = time.perf_counter() - started  # log-probs end on the CPU: synced
            if batch_index:
                seconds[name] += elapsed
                if name == "routed":
                    kept_per_window += scores.kept.sum(0).float().tolist()
    del models
    scored = sum(batch[:, 1:].numel() for batch in batches)
    return {
        "members": sum(kept_per_window) / len(kept_per_window),
        "of": len(shape.ensemble_ffn),
        "route_tokens": args.route_tokens,
        "tokens_per_s": scored / seconds["routed"],
        "full_tokens_per_s": scored / seconds["full"],
    }


def summary_rows(
    args: argparse.Namespace,
    training: dict[str, Any],
    full_eval: dict[str, Any],
    routed_eval: dict[str, Any],
    peak: tuple[float, str],
    measured_tflops: float,
) -> list[tuple[str, str]]:
    shape = args.shape
    achieved = training["tokens_per_s"] * training["flops_per_token"] / 1e12
    mfu = achieved / peak[0]
    goal = "meets" if mfu >= MFU_GOAL else "below"
    routed = (
        f"{routed_eval['tokens_per_s']:,.0f} tokens/s, {routed_eval['members']:.2f} of "
        f"{routed_eval['of']} members per window after a {routed_eval['route_tokens']}-token "
        f"prefix: {routed_eval['tokens_per_s'] / routed_eval['full_tokens_per_s']:.2f}x the "
        f"same scorer running all members ({routed_eval['full_tokens_per_s']:,.0f} tokens/s)"
    )
    return [
        ("CUDA tests (pytest -m gpu)", args.tests),
        (
            "model",
            f"hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads, FFN {shape.ffn}, "
            f"vocab {shape.vocab:,}, seq {shape.seq_len}"
            + ("  [DRY RUN: tiny model on the CPU]" if args.dry_run else ""),
        ),
        (
            "training setup",
            f"{training['precision']}, fp32 master weights, fused AdamW, fused LM-head + loss "
            f"in chunks of {training['loss_chunk_tokens']} positions, compile "
            f"{'on' if args.compile else 'off'}, "
            f"batch {args.batch_size} x {shape.seq_len}, {args.steps} steps",
        ),
        ("training tokens/s", f"{training['tokens_per_s']:,.0f} (steady state, step 1 left out)"),
        (
            "training MFU",
            f"{mfu:.1%} of {peak[0]:,.1f} TFLOP/s ({peak[1]}); {achieved:,.2f} TFLOP/s at "
            f"{training['flops_per_token'] / 1e9:.2f} GFLOP/token; goal {MFU_GOAL:.0%}: {goal}",
        ),
        (
            "measured matmul peak",
            f"{measured_tflops:,.1f} TFLOP/s (bf16, "
            + ("256^2 on the CPU)" if args.dry_run else "8192^2 on the GPU)"),
        ),
        ("training wall (incl. compile)", f"{training['wall_s']:.0f} s"),
        ("peak GPU memory (training)", f"{training['peak_memory_gib']:.1f} GiB"),
        (
            "evaluation, full ensemble",
            f"{full_eval['tokens_per_s']:,.0f} tokens/s ({full_eval['members']} members, FFN "
            f"{'/'.join(map(str, shape.ensemble_ffn))}, every member on every window)",
        ),
        ("evaluation, routed", routed),
    ]


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print("\n" + "=" * 100)
    print(machine_line())
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * 100, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = choose_device(args)
    work = Path(tempfile.mkdtemp(prefix="hdee-gpu-check-"))
    try:
        if device.type == "cuda":
            measured = matmul_peak_gflops(torch.bfloat16, size=8192, device="cuda") / 1e3
        else:
            measured = matmul_peak_gflops(torch.bfloat16, size=256, seconds=0.2) / 1e3
        training = measure_training(args, device, work)
        full_eval = measure_full_ensemble_eval(args, device, work)
        routed_eval = measure_routed_eval(args, device, work)
        rows = summary_rows(
            args, training, full_eval, routed_eval, peak_tflops(args, device, measured), measured
        )
        print_table(rows)
        if args.json:
            from hdee.atomic import write_json

            write_json(args.json, {name: value for name, value in rows})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
