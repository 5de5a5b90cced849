"""Evaluation-stage speed: hdee's label log-prob scorer against the ways it scored before.

`hdee evaluate` spends its time in `hdee.scoring.window_log_probs`: every expert of every
configuration on every domain's test and validation windows (the demo: 21 experts, 15 domains,
128 + 64 windows of 128 tokens). This benchmark scores the same windows with the same experts,
demo-sized (the `tiny` preset's S / M / L, vocabulary 4096, 128 tokens, batch 16, as
`hdee.demo_corpus.demo_config` writes them), four ways, interleaved round by round in one
process so that every way sees the same load on a shared machine:

- full log-softmax: the reference style, `log_softmax(model(x).logits.float())` of the whole
  batch `[B, T, V]` in fp32, then the label gather;
- hdee before: the scorer before this change, the LM head + `logsumexp` on 512 positions at a
  time (copied here as it was);
- hdee now: `hdee.scoring.window_log_probs` in fp32, the default (`evaluation.precision: fp32`);
- hdee now, bf16: the same under bf16 autocast (`evaluation.precision: bf16`), eager attention
  as `hdee evaluate` sets it; fp32 log-softmax. Its perplexities are not held to 1e-4.

It prints tokens/s of each (median over rounds), the median over rounds of each one's speed
ratio to "hdee before" and to the full log-softmax, and the largest relative perplexity
difference of each from the full log-softmax over the experts.

    nice python benchmarks/bench_evaluate.py               # ~2 minutes on 2 shared CPU cores
    python benchmarks/bench_evaluate.py --windows 128 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from transformers import LlamaForCausalLM

from hdee.config import ModelConfig
from hdee.data.loaders import eval_batches
from hdee.ensemble import perplexity
from hdee.model import attention_implementation, llama_config
from hdee.scoring import autocast, window_log_probs
from hdee.shapes import model_shapes
from machine import print_machine

# The full demo's shapes (hdee.demo_corpus.demo_config, quick=False).
VOCAB = 4096
SEQ_LEN = 128
BATCH_SIZE = 16
PRESET = "tiny"

Scorer = Callable[[LlamaForCausalLM, np.ndarray, int], Tensor]


def demo_experts() -> list[tuple[str, LlamaForCausalLM]]:
    """One random-init expert per size of the preset, LM head sharpened so that the
    distributions are not flat (random weights give nearly uniform ones)."""
    experts = []
    for index, (size, shape) in enumerate(model_shapes(ModelConfig(preset=PRESET)).items()):
        torch.manual_seed(index)
        model = LlamaForCausalLM(llama_config(shape, VOCAB, SEQ_LEN)).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(8)
        experts.append((size, model))
    return experts


def full_log_softmax(model: LlamaForCausalLM, tokens: np.ndarray, windows: int) -> Tensor:
    """Reference style: the whole batch's fp32 log-softmax `[B, T, V]`, then the labels."""
    rows = []
    with torch.inference_mode():
        for batch in eval_batches(tokens, SEQ_LEN, BATCH_SIZE, windows):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            rows.append(log_probs.gather(-1, batch[:, 1:, None]).squeeze(-1))
    return torch.cat(rows)


def hdee_before(model: LlamaForCausalLM, tokens: np.ndarray, windows: int) -> Tensor:
    """hdee's scorer before this change: LM head + logsumexp, 512 positions at a time."""
    head = model.get_output_embeddings()
    rows = []
    with torch.inference_mode():
        for batch in eval_batches(tokens, SEQ_LEN, BATCH_SIZE, windows):
            inputs, labels = batch[:, :-1], batch[:, 1:]
            hidden = model.model(input_ids=inputs, use_cache=False).last_hidden_state
            flat_hidden = hidden.reshape(-1, hidden.shape[-1])
            flat_labels = labels.reshape(-1)
            out = torch.empty(flat_labels.shape[0], dtype=torch.float32)
            for start in range(0, flat_labels.shape[0], 512):
                stop = start + 512
                logits = head(flat_hidden[start:stop]).float()
                label_logit = logits.gather(1, flat_labels[start:stop, None]).squeeze(1)
                out[start:stop] = label_logit - torch.logsumexp(logits, dim=1)
            rows.append(out.reshape(labels.shape))
    return torch.cat(rows)


def hdee_now(model: LlamaForCausalLM, tokens: np.ndarray, windows: int) -> Tensor:
    return window_log_probs(model, tokens, SEQ_LEN, BATCH_SIZE, windows, dtype=None)


def hdee_now_bf16(model: LlamaForCausalLM, tokens: np.ndarray, windows: int) -> Tensor:
    """`evaluation.precision: bf16` as `hdee evaluate` runs it: eager attention on a CPU."""
    device = torch.device("cpu")
    before = model.config._attn_implementation
    model.set_attn_implementation(attention_implementation(device, torch.bfloat16, SEQ_LEN))
    try:
        with autocast(device, torch.bfloat16):
            return window_log_probs(model, tokens, SEQ_LEN, BATCH_SIZE, windows, torch.bfloat16)
    finally:
        model.set_attn_implementation(before)


SCORERS: dict[str, Scorer] = {
    "full log-softmax (reference style)": full_log_softmax,
    "hdee before (512 positions, logsumexp)": hdee_before,
    "hdee now, precision fp32 (default)": hdee_now,
    "hdee now, precision bf16": hdee_now_bf16,
}
BEFORE, REFERENCE = "hdee before (512 positions, logsumexp)", "full log-softmax (reference style)"


def measure(rounds: int, windows: int) -> None:
    experts = demo_experts()
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=windows * SEQ_LEN + 1)
    tokens = tokens.astype(np.uint16)
    scored_tokens = len(experts) * windows * SEQ_LEN
    seconds: dict[str, list[float]] = {name: [] for name in SCORERS}
    ppl: dict[str, list[float]] = {}
    for name, scorer in SCORERS.items():  # warm-up, and the perplexities
        ppl[name] = [perplexity(scorer(model, tokens, windows)) for _, model in experts]
    for _ in range(rounds):
        for name, scorer in SCORERS.items():
            start = time.perf_counter()
            for _, model in experts:
                scorer(model, tokens, windows)
            seconds[name].append(time.perf_counter() - start)
    print(
        f"\n{'scorer':42s} {'tokens/s':>9s} {'vs before':>10s} {'vs full':>8s} "
        f"{'max rel ppl diff vs full':>25s}"
    )
    for name in SCORERS:
        tokens_per_s = scored_tokens / statistics.median(seconds[name])
        vs_before = statistics.median(
            b / s for b, s in zip(seconds[BEFORE], seconds[name], strict=True)
        )
        vs_full = statistics.median(
            r / s for r, s in zip(seconds[REFERENCE], seconds[name], strict=True)
        )
        diff = max(abs(a - r) / r for a, r in zip(ppl[name], ppl[REFERENCE], strict=True))
        print(f"{name:42s} {tokens_per_s:9,.0f} {vs_before:9.2f}x {vs_full:7.2f}x {diff:25.2e}")
    print("\nperplexity per expert (full log-softmax):", [f"{p:.3f}" for p in ppl[REFERENCE]])
    print("(tokens/s: median over rounds; ratios: median over rounds of the per-round ratio)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--windows", type=int, default=32, help="windows per expert (32)")
    args = parser.parse_args()
    print_machine()
    shapes = model_shapes(ModelConfig(preset=PRESET))
    sizes = ", ".join(f"{size} FFN {shape.intermediate_size}" for size, shape in shapes.items())
    first = next(iter(shapes.values()))
    print(
        f"experts: preset {PRESET} (hidden {first.hidden_size}, {first.num_layers} layers; "
        f"{sizes}), vocab {VOCAB}; {args.windows} windows of {SEQ_LEN} tokens per expert, "
        f"batch {BATCH_SIZE}; {args.rounds} interleaved rounds"
    )
    measure(args.rounds, args.windows)


if __name__ == "__main__":
    main()
