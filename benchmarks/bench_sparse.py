"""Routed (sparse) ensembles: scored tokens/s and perplexity of the full ensemble vs top-1 and
top-2 prefix routing, on one 9-expert forest and one text, in one run.

The forest is built here, like the demo's with `members: all`: 3 lanes of sizes S / M / L, each
trained for 3 iterations on 3 synthetic domains (first-order Markov chains with disjoint
transition tables), each iteration continuing from the lane's previous expert, so every
expert knows its last domain best and has partly forgotten the earlier ones. The test text is
windows of the 3 domains in turn (a mixed, held-out-like text): the best single expert is the
best one on all of it, while routing picks per window.

Every system is scored by the live ensemble every hdee command runs (`hdee.hf_ensemble`,
through `hdee.inference.ensemble_label_log_probs`): routed-away experts really skip their
forward passes after the routing prefix. Printed:
scored tokens/s, perplexity, forward FLOPs per token, and the share of the full ensemble's
perplexity gain over the best single expert each system keeps.

    python benchmarks/bench_sparse.py          # ~2 minutes on 2 CPU cores (training included)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import LlamaForCausalLM

from hdee.config import ModelConfig
from hdee.ensemble import perplexity
from hdee.hf_ensemble import HdeeEnsembleForCausalLM
from hdee.inference import ensemble_label_log_probs
from hdee.model import llama_config
from hdee.routing import routed_flops_per_token
from hdee.scoring import label_log_probs
from hdee.shapes import forward_flops_per_token, model_shapes
from machine import print_machine

VOCAB = 256
SEQ_LEN = 1024
ROUTE_TOKENS = 32
DOMAINS = 3
SIZES = {"S": 288, "M": 384, "L": 480}  # FFN widths 0.75 / 1 / 1.25, as HDEE's S / M / L
LANE_ORDER = {"S": [0, 1, 2], "M": [1, 2, 0], "L": [2, 0, 1]}  # domain of each iteration


def markov_tables(seed: int) -> list[np.ndarray]:
    """One transition table per domain: each token has 4 likely successors, different per
    domain, plus a little uniform noise."""
    rng = np.random.default_rng(seed)
    tables = []
    for _ in range(DOMAINS):
        table = np.full((VOCAB, VOCAB), 0.02 / VOCAB)
        for token in range(VOCAB):
            successors = rng.choice(VOCAB, size=4, replace=False)
            table[token, successors] += 0.98 * rng.dirichlet(np.ones(4))
        tables.append(table / table.sum(axis=1, keepdims=True))
    return tables


def sample(table: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    cumulative = table.cumsum(axis=1)
    tokens = np.empty(length, dtype=np.int64)
    tokens[0] = rng.integers(VOCAB)
    draws = rng.random(length)
    for i in range(1, length):
        tokens[i] = min(int(np.searchsorted(cumulative[tokens[i - 1]], draws[i])), VOCAB - 1)
    return tokens


def train(model: LlamaForCausalLM, table: np.ndarray, steps: int, rng: np.random.Generator) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = torch.tensor(np.stack([sample(table, 65, rng) for _ in range(8)]))
        loss = torch.nn.functional.cross_entropy(
            model(input_ids=batch[:, :-1]).logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build_forest(steps: int, seed: int) -> tuple[list[str], list[LlamaForCausalLM], list]:
    """(names, models, tables): 3 lanes x 3 iterations, lane@iteration."""
    tables = markov_tables(seed)
    rng = np.random.default_rng(seed + 1)
    shapes = model_shapes(ModelConfig(hidden_size=128, num_layers=2, num_heads=4, ffn_sizes=SIZES))
    names, models = [], []
    for lane, order in LANE_ORDER.items():
        torch.manual_seed(seed + len(names))
        model = LlamaForCausalLM(llama_config(shapes[lane], VOCAB, SEQ_LEN))
        for iteration, domain in enumerate(order, start=1):
            train(model, tables[domain], steps, rng)
            snapshot = LlamaForCausalLM(model.config)
            snapshot.load_state_dict(model.state_dict())
            names.append(f"{lane}@{iteration}")
            models.append(snapshot.eval())
    return names, models, tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per iteration")
    parser.add_argument("--windows", type=int, default=9, help="test windows (domains in turn)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is kept")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print_machine()
    start = time.perf_counter()
    names, models, tables = build_forest(args.steps, args.seed)
    print(
        f"built {len(models)} experts ({', '.join(names)}) in {time.perf_counter() - start:.0f} s"
    )

    rng = np.random.default_rng(args.seed + 2)
    windows = [sample(tables[i % DOMAINS], SEQ_LEN + 1, rng) for i in range(args.windows)]
    batch = torch.tensor(np.stack(windows))
    scored = batch.shape[0] * SEQ_LEN
    flops = [float(forward_flops_per_token(m.config, SEQ_LEN)) for m in models]

    with torch.inference_mode():
        singles = [perplexity(label_log_probs(m, batch)) for m in models]
    best = int(np.argmin(singles))
    print(f"best single expert on the whole text: {names[best]}, perplexity {singles[best]:.3f}")

    systems = {
        label: HdeeEnsembleForCausalLM.from_experts(models, routing=routing).eval()
        for label, routing in [
            ("full (9 experts)", {"mode": "none"}),
            ("top-2", {"mode": "prefix", "top_k": 2, "route_tokens": ROUTE_TOKENS}),
            ("top-1", {"mode": "prefix", "top_k": 1, "route_tokens": ROUTE_TOKENS}),
        ]
    }
    seconds = dict.fromkeys(systems, float("inf"))
    scores = {}
    # Round robin, best time of each: a busy machine slows whichever system it happens to hit.
    for _ in range(args.repeats):
        for label, ensemble in systems.items():
            start = time.perf_counter()
            scores[label] = ensemble_label_log_probs(ensemble, batch)
            seconds[label] = min(seconds[label], time.perf_counter() - start)
    rows = {}
    for label, result in scores.items():
        cost = routed_flops_per_token(flops, result.kept, result.route_tokens, SEQ_LEN)
        rows[label] = (scored / seconds[label], perplexity(result.log_probs), cost)

    full_speed, full_ppl, full_cost = rows["full (9 experts)"]
    gain = singles[best] - full_ppl
    print(
        f"\n{args.windows} windows x {SEQ_LEN} tokens, routing prefix r = {ROUTE_TOKENS}; "
        f"best of {args.repeats} runs"
    )
    print(
        f"{'system':<18}{'tokens/s':>10}{'speed-up':>10}{'perplexity':>12}{'FLOPs/token':>13}"
        f"{'gain kept':>11}"
    )
    print(
        f"{'best single':<18}{'':>10}{'':>10}{singles[best]:>12.3f}{flops[best]:>13.3g}{'0%':>11}"
    )
    for label, (speed, ppl, cost) in rows.items():
        kept = f"{(singles[best] - ppl) / gain:.0%}" if gain > 0 else "n/a"
        print(
            f"{label:<18}{speed:>10.0f}{speed / full_speed:>9.2f}x{ppl:>12.3f}{cost:>13.3g}"
            f"{kept:>11}"
        )


if __name__ == "__main__":
    main()
