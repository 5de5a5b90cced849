"""Evaluation speed and peak memory: hdee's evaluator vs a reference-style evaluator.

Both score the same experts (3 random-init Llamas, 32K vocabulary, FFN widths S / M / L) on the
same windows with the four methods (simple average, uniform prior, cached prior on validation
windows, single experts), using the same, correct mixing formulas, so their perplexities must
agree. They differ in how they get the label log-probabilities:

- hdee (`hdee.evaluate.evaluate_run`, starting from an empty cache): each expert runs once per
  (domain, split), one expert in memory at a time, and the LM head + log-sum-exp run on chunks
  of positions; every method is mixed from the cached `[windows, seq_len]` label log-probs.
- reference-style (the public reference's structure): all experts loaded, every method re-runs
  every expert, each keeping the full-vocabulary `log_softmax` tensor `[B, T, V]` of a batch.

Each evaluator runs in a fresh subprocess, so its peak resident memory (`ru_maxrss`) is its
own; the memory above the process's RSS right after `import torch, transformers` is printed too.

    python benchmarks/bench_evaluate.py            # ~5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from machine import print_machine

VOCAB = 32_000
HIDDEN = 128
SEQ_LEN = 256
TEST_WINDOWS = 24
VALIDATION_WINDOWS = 8
BATCH_SIZE = 8
DOMAINS = ["domain_a", "domain_b"]
LANES = {"easy": ("expert_s", 512), "moderate": ("expert_m", 768), "difficult": ("expert_l", 1024)}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_run(root: Path) -> None:
    from hdee.atomic import write_json
    from hdee.data.tokens import write_tokens
    from hdee.layout import RunLayout

    layout = RunLayout.of(root)
    for lane_index, (job_id, ffn) in enumerate(LANES.values()):
        torch.manual_seed(lane_index)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=ffn,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=SEQ_LEN,
        )
        model = LlamaForCausalLM(config)
        with torch.no_grad():  # sharper than random init, so the experts disagree visibly
            model.lm_head.weight.mul_(2)
        model.save_pretrained(layout.job(job_id).final, safe_serialization=True)
    rng = np.random.default_rng(0)
    windows = {"test": TEST_WINDOWS, "validation": VALIDATION_WINDOWS}
    for domain in DOMAINS:
        for split, count in windows.items():
            tokens = rng.integers(0, VOCAB, size=count * SEQ_LEN + 1).astype(np.uint16)
            write_tokens(layout.tokens(domain, split), tokens, {"vocab_size": VOCAB})
    plan = {
        "lanes": list(LANES),
        "trained_domains": DOMAINS[:1],
        "held_out_domains": DOMAINS[1:],
        "configurations": {
            "bench": {"ensembles": [{lane: job for lane, (job, _) in LANES.items()}]}
        },
    }
    write_json(layout.plan, plan)


def experiment_config(root: Path) -> Any:
    from hdee.config import parse_config

    corpus = {"source": {"type": "local", "paths": ["unused.txt"]}}
    return parse_config(
        {
            "run_dir": str(root),
            "data": {
                "seq_len": SEQ_LEN,
                "general": {"name": "general", **corpus},
                "domains": [{"name": d, **corpus} for d in DOMAINS],
            },
            "plan": {"held_out": DOMAINS[1:]},
            "evaluation": {
                "batch_size": BATCH_SIZE,
                "cached_prior_sequences": VALIDATION_WINDOWS,
                "max_test_sequences": TEST_WINDOWS,
            },
        }
    )


def run_ours(root: Path) -> dict[str, float]:
    from hdee.evaluate import evaluate_run

    results = evaluate_run(root, experiment_config(root), progress=False)
    domains = results["configurations"]["bench"]["iterations"]["1"]["domains"]
    perplexities = {}
    for domain, scores in domains.items():
        for method, score in scores["methods"].items():
            if method != "best_single":
                perplexities[f"{domain}/{method}"] = score["perplexity"]
        for lane, score in scores["single_experts"].items():
            perplexities[f"{domain}/single:{lane}"] = score["perplexity"]
    return perplexities


def run_reference(root: Path) -> dict[str, float]:
    """The public reference's structure: every method re-runs every expert and keeps the
    full-vocabulary log-softmax of each expert for the batch; the mixing math is hdee's."""
    from hdee.data.loaders import eval_batches
    from hdee.data.tokens import load_tokens
    from hdee.ensemble import (
        estimate_cached_prior,
        mixture_log_probs,
        perplexity,
        simple_average,
    )
    from hdee.layout import RunLayout

    layout = RunLayout.of(root)
    models = [
        LlamaForCausalLM.from_pretrained(layout.job(job).final, use_safetensors=True).eval()
        for job, _ in LANES.values()
    ]

    def full_log_probs(split: str, domain: str, windows: int) -> list[torch.Tensor]:
        """Per batch: every expert's label log-probs [E, B, T], through [E, B, T, V]."""
        tokens = load_tokens(layout.tokens(domain, split))
        out = []
        for batch in eval_batches(tokens, SEQ_LEN, BATCH_SIZE, windows):
            with torch.no_grad():
                full = torch.stack(
                    [torch.log_softmax(m(input_ids=batch[:, :-1]).logits, -1) for m in models]
                )
            labels = batch[:, 1:].expand(len(models), -1, -1)[..., None]
            out.append(full.gather(-1, labels).squeeze(-1))
        return out

    perplexities = {}
    for domain in DOMAINS:
        test = lambda d=domain: full_log_probs("test", d, TEST_WINDOWS)  # noqa: E731
        simple = torch.cat([simple_average(lp) for lp in test()])
        perplexities[f"{domain}/simple_average"] = perplexity(simple)
        uniform = torch.cat([mixture_log_probs(lp, None, "prefix") for lp in test()])
        perplexities[f"{domain}/uniform_prior"] = perplexity(uniform)
        validation = torch.cat(full_log_probs("validation", domain, VALIDATION_WINDOWS), dim=1)
        prior = estimate_cached_prior(validation.double().sum(2).T, 0.3)
        cached = torch.cat([mixture_log_probs(lp, prior.log(), "prefix") for lp in test()])
        perplexities[f"{domain}/cached_prior"] = perplexity(cached)
        singles = torch.cat(test(), dim=1)
        for j, lane in enumerate(LANES):
            perplexities[f"{domain}/single:{lane}"] = perplexity(singles[j])
    return perplexities


def worker(kind: str, root: Path) -> None:
    baseline = rss_mb()
    start = time.perf_counter()
    perplexities = run_ours(root) if kind == "ours" else run_reference(root)
    seconds = time.perf_counter() - start
    report = {
        "seconds": seconds,
        "tokens": len(DOMAINS) * TEST_WINDOWS * SEQ_LEN,
        "peak_rss_mb": rss_mb(),
        "baseline_rss_mb": baseline,
        "perplexities": perplexities,
    }
    print(json.dumps(report))


def spawn(kind: str, root: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--run", str(root)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["ours", "reference"])
    parser.add_argument("--run", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.run)
        return

    print_machine()
    with tempfile.TemporaryDirectory(prefix="hdee-bench-evaluate-") as tmp:
        root = Path(tmp) / "run"
        build_run(root)
        print(
            f"3 experts (hidden {HIDDEN}, 4 layers, FFN 512/768/1024, vocab {VOCAB}), "
            f"{len(DOMAINS)} domains x {TEST_WINDOWS} test windows of {SEQ_LEN} tokens "
            f"(+{VALIDATION_WINDOWS} validation windows for the cached prior), batch {BATCH_SIZE}, "
            f"{torch.get_num_threads()} CPU threads"
        )
        reference = spawn("reference", root)
        ours = spawn("ours", root)

    for name in reference["perplexities"]:
        a, b = ours["perplexities"][name], reference["perplexities"][name]
        assert abs(a - b) <= 1e-4 * b, f"{name}: hdee {a} vs reference {b}"
    print("perplexities (hdee = reference, to 1e-4 relative):")
    for name, value in ours["perplexities"].items():
        print(f"  {name:32s} {value:12.3f}   reference {reference['perplexities'][name]:12.3f}")

    print(
        f"\n{'evaluator':12s} {'seconds':>8s} {'tokens/s':>9s} {'peak RSS MB':>12s} "
        f"{'above import MB':>16s}"
    )
    for name, r in (("reference", reference), ("hdee", ours)):
        print(
            f"{name:12s} {r['seconds']:8.2f} {r['tokens'] / r['seconds']:9.0f} "
            f"{r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] - r['baseline_rss_mb']:16.0f}"
        )
    # Windows each evaluator pushes through every expert: the structural part of the speed-up.
    ours_windows = len(DOMAINS) * (TEST_WINDOWS + VALIDATION_WINDOWS)
    reference_windows = len(DOMAINS) * (4 * TEST_WINDOWS + VALIDATION_WINDOWS)
    print(
        f"\nwindows run per expert: reference {reference_windows}, hdee {ours_windows} "
        f"({reference_windows / ours_windows:.2f}x fewer)"
    )
    speedup = reference["seconds"] / ours["seconds"]
    memory = ours["peak_rss_mb"] / reference["peak_rss_mb"]
    above = (ours["peak_rss_mb"] - ours["baseline_rss_mb"]) / (
        reference["peak_rss_mb"] - reference["baseline_rss_mb"]
    )
    print(f"speed-up {speedup:.2f}x (goal >= 3x)")
    print(
        f"peak memory ratio {memory:.3f} of the reference's, {above:.3f} above the import "
        f"baseline (goal <= 0.25)"
    )


if __name__ == "__main__":
    main()
