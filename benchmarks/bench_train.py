"""Training throughput and quality: hdee's job vs a reference-style loop, same model and data.

The reference loop is what the public HDEE code does: the Llama model with every weight cast to
bf16 (`model.to(torch.bfloat16)`), plain `torch.optim.Adam` at lr 6e-5, and rows read from a
parquet file through a streaming `datasets` reader, turned into tensors one sample at a time.

hdee's job (`hdee.train.run_training`) trains the same initial weights on the same windows with
the same batch and lr: fp32 master weights (bf16 autocast only on GPUs), fused AdamW, batches
sliced straight out of a memory-mapped token file.

Both report tokens/s of the training loop (data loading included; hdee's excludes its one
evaluation and checkpoint, which the reference does not do), the training loss of the last
step, and the validation loss of the final weights on the same held-out windows.

    python benchmarks/bench_train.py [--steps 20] [--hidden 128] [--layers 2] [--seq-len 128]
        [--reference-fp32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hdee.config import TrainingConfig
from hdee.data.loaders import eval_batches, train_batch
from hdee.data.tokens import load_tokens, write_tokens
from hdee.model import llama_config, load_model
from hdee.shapes import ModelShape
from hdee.train import TrainSpec, run_training


def markov_tokens(count: int, vocab: int, seed: int = 0) -> np.ndarray:
    """A learnable stream: each token has 4 likely successors (loss floor about ln 4), plus
    10% uniform noise."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 4))
    choice = rng.integers(0, 4, size=count)
    noise = rng.random(count) < 0.1
    random_tokens = rng.integers(0, vocab, size=count)
    out = np.empty(count, dtype=np.uint16)
    token = 0
    for i in range(count):
        token = random_tokens[i] if noise[i] else successors[token, choice[i]]
        out[i] = token
    return out


def write_reference_parquet(tokens: np.ndarray, args: argparse.Namespace, path: Path) -> None:
    """The same training windows, in the same order, as parquet rows of `input_ids`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for step in range(args.steps):
        batch = train_batch(tokens, args.seq_len, args.batch_size, args.seed, step)
        rows.extend(row.tolist() for row in batch)
    pq.write_table(pa.table({"input_ids": rows}), path)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, tokens: np.ndarray, args: argparse.Namespace) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(tokens, args.seq_len, args.batch_size, args.eval_windows):
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        total += float(
            F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        )
        count += batch[:, 1:].numel()
    return total / count


def run_reference(
    config,
    parquet: Path,
    val_tokens: np.ndarray,
    args: argparse.Namespace,
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    from datasets import load_dataset
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)  # the same initial weights as hdee's seed job
    model = LlamaForCausalLM(config)
    model.to(dtype)  # every weight in bf16: the reference's choice
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    start = time.perf_counter()
    stream = load_dataset("parquet", data_files=str(parquet), split="train", streaming=True)
    rows: list[torch.Tensor] = []
    for record in stream:
        rows.append(torch.tensor(record["input_ids"], dtype=torch.long))  # one sample at a time
        if len(rows) < args.batch_size:
            continue
        batch = torch.stack(rows)
        rows = []
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    tokens = len(losses) * args.batch_size * args.seq_len
    return {
        "tokens_per_s": tokens / seconds,
        "steps": len(losses),
        "train_loss": losses[-1],
        "val_loss": validation_loss(model, val_tokens, args),
    }


def run_hdee(config, train_path: Path, val_path: Path, work: Path, args) -> dict:
    spec = TrainSpec(
        kind="seed",
        model=config.to_dict(),
        train_tokens=str(train_path),
        validation={"val": str(val_path)},
        seq_len=args.seq_len,
        seed=args.seed,
        training=TrainingConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            min_lr=args.lr,  # constant lr, as the reference
            warmup_steps=0,
            eval_every=args.steps,
            eval_batches=math.ceil(args.eval_windows / args.batch_size),
            checkpoint_every=args.steps,
            keep_checkpoints=1,
        ),
        output_dir=str(work / "hdee_job"),
    )
    started = time.perf_counter()
    result = run_training(spec, progress=False)
    wall = time.perf_counter() - started
    rows = [json.loads(x) for x in (work / "hdee_job" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    # Each log row covers the steps since the previous one; sum their training time.
    previous, seconds = 0, 0.0
    for row in train_rows:
        seconds += (row["tokens"] - previous) / row["tokens_per_s"]
        previous = row["tokens"]
    model = load_model(work / "hdee_job" / "final")
    return {
        "tokens_per_s": result["tokens"] / seconds,
        "tokens_per_s_end_to_end": result["tokens"] / wall,
        "steps": result["steps"],
        "train_loss": result["final_loss"],
        "val_loss": validation_loss(model, load_tokens(val_path), args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=6e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads for both loops (0: torch's default). On a shared, busy "
        "machine 1 thread is far faster and steadier than spin-waiting OpenMP threads.",
    )
    parser.add_argument(
        "--reference-fp32",
        action="store_true",
        help="also time the reference loop with fp32 weights (isolates the data path and "
        "optimizer from the bf16 cost, which is large on CPUs without native bf16)",
    )
    parser.add_argument("--eval-windows", type=int, default=32)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="hdee-bench-train-"))
    try:
        needed = args.steps * args.batch_size * args.seq_len + 1
        stream = markov_tokens(needed + args.eval_windows * args.seq_len + 1, args.vocab)
        train_path, val_path = work / "train.bin", work / "val.bin"
        write_tokens(train_path, stream[:needed], {"vocab_size": args.vocab})
        write_tokens(val_path, stream[needed:], {"vocab_size": args.vocab})
        parquet = work / "train.parquet"
        write_reference_parquet(load_tokens(train_path), args, parquet)
        shape = ModelShape("bench", args.hidden, args.layers, args.heads, args.heads, args.ffn)
        config = llama_config(shape, args.vocab, args.seq_len)
        print(
            f"model: hidden {args.hidden}, layers {args.layers}, ffn {args.ffn}, vocab "
            f"{args.vocab}; batch {args.batch_size} x seq {args.seq_len}; {args.steps} steps; "
            f"lr {args.lr}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}",
            flush=True,
        )
        reference = run_reference(config, parquet, load_tokens(val_path), args)
        print(f"reference (bf16 weights, Adam, streaming parquet): {reference}", flush=True)
        if args.reference_fp32:
            fp32 = run_reference(config, parquet, load_tokens(val_path), args, torch.float32)
            print(f"reference with fp32 weights (not the reference's setting): {fp32}", flush=True)
        ours = run_hdee(config, train_path, val_path, work, args)
        print(f"hdee (fp32 master weights, fused AdamW, memmap): {ours}", flush=True)
        ratio = ours["tokens_per_s"] / reference["tokens_per_s"]
        print(
            f"\ntokens/s   reference {reference['tokens_per_s']:,.0f}   hdee "
            f"{ours['tokens_per_s']:,.0f} (end to end incl. eval+checkpoint "
            f"{ours['tokens_per_s_end_to_end']:,.0f})   ratio {ratio:.2f}x\n"
            f"train loss reference {reference['train_loss']:.4f}   hdee {ours['train_loss']:.4f}"
            f"   (batch loss at step {args.steps})\n"
            f"val loss   reference {reference['val_loss']:.4f}   hdee {ours['val_loss']:.4f}"
            f"   after {args.steps} steps"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
