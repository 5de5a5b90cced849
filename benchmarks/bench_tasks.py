"""lm-evaluation-harness throughput: the ensemble against a single expert, through one adapter.

Multiple-choice tasks score several continuations of each context. `hdee.tasks.HdeeLM` runs
each context once (per expert, inside the ensemble) and scores its continuations from copies of
that KV cache; the harness's own HFLM re-runs the context with every continuation. This script
times loglikelihood requests (CONTEXTS contexts x CHOICES continuations) for:

- the 3-expert ensemble (`HdeeEnsembleForCausalLM`, FFN widths S / M / L) through HdeeLM,
- its M expert alone (a plain LlamaForCausalLM) through HdeeLM,
- both again through the harness's HFLM, for reference,

and prints requests/s and the ensemble / single-expert ratio. Random-init models: speed only.

    python benchmarks/bench_tasks.py            # ~1-2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hdee.hf_ensemble import HdeeEnsembleConfig, HdeeEnsembleForCausalLM
from hdee.tasks import hdee_lm
from machine import print_machine

VOCAB = 8_000
HIDDEN = 128
LAYERS = 4
WIDTHS = {"S": 256, "M": 384, "L": 512}


def expert(width: int, seed: int, context: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=width,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=context + 64,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w0", pad_token="w0")


def time_requests(lm, requests, repeats: int) -> float:
    """Best requests/s over `repeats` runs (the first also warms up)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        lm._loglikelihood_tokens(requests, disable_tqdm=True)
        best = max(best, len(requests) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=16)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--context-tokens", type=int, default=192)
    parser.add_argument("--continuation-tokens", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(args.threads)
    print_machine()
    rng = random.Random(0)
    requests = []
    for c in range(args.contexts):
        context = [rng.randrange(1, VOCAB) for _ in range(args.context_tokens)]
        for x in range(args.choices):
            continuation = [rng.randrange(1, VOCAB) for _ in range(args.continuation_tokens)]
            requests.append(((f"c{c}", f"x{x}"), context, continuation))
    models = [expert(w, s, args.context_tokens) for s, w in enumerate(WIDTHS.values())]
    config = HdeeEnsembleConfig(
        experts=[
            {"name": n, "lane": n, "iteration": 1, "job_id": n, "llama": m.config.to_dict()}
            for n, m in zip(WIDTHS, models, strict=True)
        ]
    )
    ensemble = HdeeEnsembleForCausalLM(config).eval()
    for target, model in zip(ensemble.experts, models, strict=True):
        target.load_state_dict(model.state_dict())
    single = models[1]
    print(
        f"{len(requests)} loglikelihood requests: {args.contexts} contexts of "
        f"{args.context_tokens} tokens x {args.choices} continuations of "
        f"{args.continuation_tokens}; vocabulary {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, "
        f"FFN {WIDTHS}; batch size {args.batch_size}"
    )
    rates = {}
    with torch.no_grad():
        for name, model in (("ensemble (3 experts)", ensemble), ("single expert (M)", single)):
            rates[("HdeeLM", name)] = time_requests(
                hdee_lm(model, tokenizer(), args.batch_size), requests, args.repeats
            )
            harness = HFLM(pretrained=model, tokenizer=tokenizer(), batch_size=args.batch_size)
            rates[("HFLM", name)] = time_requests(harness, requests, args.repeats)
    print(f"{'adapter':<8} {'system':<22} {'requests/s':>10}")
    for (adapter, name), rate in rates.items():
        print(f"{adapter:<8} {name:<22} {rate:>10.1f}")
    for adapter in ("HdeeLM", "HFLM"):
        ratio = rates[(adapter, "ensemble (3 experts)")] / rates[(adapter, "single expert (M)")]
        print(f"{adapter}: ensemble / single expert requests/s = {ratio:.2f}")
    for name in ("ensemble (3 experts)", "single expert (M)"):
        gain = rates[("HdeeLM", name)] / rates[("HFLM", name)]
        print(f"{name}: HdeeLM / HFLM requests/s = {gain:.2f}")


if __name__ == "__main__":
    main()
