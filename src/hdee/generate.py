"""`hdee generate`: text from an ensemble, with each new token's expert weights.

The ensemble is the live model every inference command runs (`hdee.hf_ensemble`, built from an
ensemble spec by `hdee.inference`): at every step the next-token distribution is the
posterior-weighted mixture of the experts' distributions,
`p(x | x_<t) = sum_j p_j(x | x_<t) P(j | x_<t)`, and the posterior is updated with the token
that was chosen (prompt tokens included), exactly as in evaluation (`hdee.ensemble`). Each
expert keeps its own KV cache, so a step costs one token per expert still running. With
routing (prefix or budget), every expert reads the first `route_tokens` tokens, then only the
kept ones run; with prior routing only the prior's top k ever run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from hdee.atomic import read_json
from hdee.config import load_config
from hdee.ensemble_spec import EnsembleSpec, SpecError, spec_defaults
from hdee.hf_ensemble import OUTPUT_CACHE_FIELD, HdeeEnsembleForCausalLM
from hdee.inference import build_ensemble, resolve_ensemble
from hdee.layout import RunLayout
from hdee.records import ResolvedEnsemble

DEFAULT_NEW_TOKENS = 50  # hdee generate's default length, when the experts' context allows it


@dataclass
class Generation:
    """What `generate_ids` produced."""

    token_ids: list[int]  # the new tokens only
    token_log_probs: list[float] = field(default_factory=list)  # mixture log-prob of each
    posterior: list[float] = field(default_factory=list)  # P(j | everything), after the last
    # P(j | x_<t) each expert had when each new token was chosen (0 once routed away).
    weights: list[list[float]] = field(default_factory=list)
    tokens_run: list[int] = field(default_factory=list)  # per expert: tokens it ran forward on
    kept: list[int] = field(default_factory=list)  # the experts still running at the end
    routed_at: int | None = None  # r: tokens every expert ran before routing (None: never)


def _choose(
    log_probs: Tensor,
    greedy: bool,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
) -> int:
    """The next token from the mixture's log-probabilities `[V]`."""
    if greedy:
        return int(log_probs.argmax())
    scores = log_probs / temperature
    if top_k is not None and top_k < scores.shape[0]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    probs = torch.softmax(scores, dim=0)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def routing_position(model: HdeeEnsembleForCausalLM) -> int | None:
    """The position at which the ensemble routes (None: it never routes on the way; prior
    routing happens before the first token, at 0)."""
    routing = model.config.routing
    if routing["mode"] in ("prefix", "budget"):
        return int(routing["route_tokens"])
    return 0 if routing["mode"] == "prior" else None


def _read(model: HdeeEnsembleForCausalLM, tokens: Sequence[int], cache: Any) -> tuple[Any, Any]:
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=model.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{"cache": cache})
    return out, getattr(out, OUTPUT_CACHE_FIELD)


@torch.inference_mode()
def generate_ids(
    model: HdeeEnsembleForCausalLM,
    input_ids: Sequence[int],
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    eos_token_id: int | None = None,
) -> Generation:
    """Continue `input_ids` with the ensemble `model` (its posterior, prior and routing are its
    config's). Stops after `max_new_tokens` or at `eos_token_id` (which is kept in the output).
    """
    if not input_ids:
        raise ValueError("need at least one input token (e.g. the EOS that starts a document)")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    generator = torch.Generator().manual_seed(seed)
    # Every expert reads the routing prefix as its own chunk: the live model then routes on the
    # next chunk's first token from its cache, so routed-away experts never read the rest.
    at = routing_position(model)
    prompt = list(input_ids)
    pieces = [prompt[:at], prompt[at:]] if at and len(prompt) > at else [prompt]
    out, cache = None, None
    for piece in pieces:
        out, cache = _read(model, piece, cache)
    assert out is not None and cache is not None
    generation = Generation(token_ids=[])
    for step in range(max_new_tokens):
        mixture = out.logits[0, -1]  # [V]: log of the ensemble's next-token distribution
        token = _choose(mixture, greedy, temperature, top_k, generator)
        generation.token_ids.append(token)
        generation.token_log_probs.append(float(mixture[token]))
        generation.weights.append(model.posterior_log_weights(cache)[0].exp().tolist())
        if token == eos_token_id or step == max_new_tokens - 1:
            break  # the final posterior credits the last token; no expert needs to read it
        out, cache = _read(model, [token], cache)
    last = torch.tensor([generation.token_ids[-1]])
    generation.posterior = model.posterior_log_weights(cache, last)[0].exp().tolist()
    generation.tokens_run = cache.tokens_run.tolist()
    running = cache.kept[0] | ~cache.routed[0]
    generation.kept = [j for j in range(len(model.experts)) if bool(running[j])]
    generation.routed_at = at if bool(cache.routed[0]) else None
    return generation


@dataclass
class Continuation:
    """A generated continuation with what produced it (for the CLI's summary and JSON lines)."""

    text: str
    generation: Generation
    members: list[str]  # the experts' names, in the order of `generation.weights`
    tokens: list[str]  # each new token as text
    ensemble: ResolvedEnsemble | None = None  # the spec that produced it


def prompt_ids(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """The prompt's token ids, preceded by the EOS token, which separates documents in hdee's
    training data, so the experts read it as the start of a document."""
    eos = tokenizer.eos_token_id
    return ([eos] if eos is not None else []) + tokenizer.encode(prompt, add_special_tokens=False)


def experts_context(layout: RunLayout, resolved: ResolvedEnsemble) -> tuple[int, Path]:
    """(positions, the config.json that sets them): the smallest `max_position_embeddings` of
    the members, the sequence length they trained on. Reads config.json only."""
    contexts = {
        path: int(read_json(path)["max_position_embeddings"])
        for path in (layout.job(job).final / "config.json" for job in resolved.members.values())
    }
    path = min(contexts, key=lambda key: contexts[key])
    return contexts[path], path


def check_generation(
    context: tuple[int, Path], prompt_tokens: int, max_new_tokens: int, spec: EnsembleSpec
) -> None:
    """Refuse (exit 2) a generation the ensemble cannot do as asked, before any model loads:
    one that reads past the experts' context (past it a model reads positions it never trained
    on, and a typo such as 100000000 would run for days), or one that would route after more
    tokens than it reads."""
    positions, source = context
    read = prompt_tokens + max_new_tokens - 1  # the prompt and every new token but the last
    if read > positions:
        room = positions - prompt_tokens + 1
        allowed = f"must be in 1..{room}" if room >= 1 else "the prompt alone is too long"
        raise SpecError(
            f"--max-new-tokens {max_new_tokens}: {allowed}: the experts read the prompt "
            f"({prompt_tokens} tokens with the EOS before it) and every new token but the "
            f"last, at most {positions} positions (max_position_embeddings in {source})"
        )
    if spec.routing in ("prefix", "budget") and spec.route_tokens > read:
        raise SpecError(
            f"--route-tokens {spec.route_tokens}: the ensemble routes after reading that many "
            f"tokens, and this generation reads only {read} (the prompt's {prompt_tokens} and "
            f"the first {max_new_tokens - 1} new ones); expected --route-tokens <= {read}"
        )


def continue_from_run(
    layout: RunLayout,
    configuration: str,
    prompt: str,
    spec: EnsembleSpec | None = None,
    max_new_tokens: int | None = None,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> Continuation:
    """The continuation of `prompt` by a configuration's ensemble as `spec` describes it
    (default: the run's evaluation keys, `ensemble_spec.spec_defaults`), with its per-token
    expert weights and the resolved spec. `max_new_tokens` None: DEFAULT_NEW_TOKENS, or fewer
    where the experts' context ends first."""
    config = load_config(layout.config, overrides={"run_dir": str(layout.root)})
    if spec is None:
        spec = EnsembleSpec(**spec_defaults(config.evaluation))
    resolved = resolve_ensemble(spec, config, layout, configuration)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(layout.tokenizer)
    input_ids = prompt_ids(tokenizer, prompt)
    context = experts_context(layout, resolved)
    if max_new_tokens is None:
        max_new_tokens = max(1, min(DEFAULT_NEW_TOKENS, context[0] - len(input_ids) + 1))
    check_generation(context, len(input_ids), max_new_tokens, spec)
    model = build_ensemble(resolved, layout, config.data.seq_len)
    eos = tokenizer.eos_token_id if stop_at_eos else None
    generation = generate_ids(
        model, input_ids, max_new_tokens, greedy, temperature, top_k, seed, eos
    )
    return Continuation(
        text=tokenizer.decode(generation.token_ids, skip_special_tokens=True),
        generation=generation,
        members=list(resolved.members),
        tokens=[tokenizer.decode([token]) for token in generation.token_ids],
        ensemble=resolved,
    )


def generate_from_run(layout: RunLayout, configuration: str, prompt: str, **kwargs: Any) -> str:
    """The continuation (new text only) of `prompt` by a configuration's ensemble
    (`continue_from_run`'s arguments)."""
    return continue_from_run(layout, configuration, prompt, **kwargs).text


def expert_usage(continuation: Continuation) -> list[dict[str, Any]]:
    """Per expert: its mean weight over the new tokens, the tokens it ran a forward pass on,
    and whether it was still running at the end (the summary `hdee generate` prints)."""
    generation = continuation.generation
    steps = max(1, len(generation.weights))
    return [
        {
            "expert": name,
            "mean_weight": sum(w[j] for w in generation.weights) / steps,
            "tokens_run": generation.tokens_run[j],
            "kept": j in generation.kept,
        }
        for j, name in enumerate(continuation.members)
    ]


def weights_jsonl(continuation: Continuation) -> str:
    """A first line `{"ensemble": ...}` (the resolved spec that generated), then one JSON line
    per new token: its step, id, text, mixture log-prob and each expert's weight P(j | x_<t)
    when it was chosen (for attribution)."""
    lines = []
    if continuation.ensemble is not None:
        spec = continuation.ensemble.model_dump(mode="json", exclude_none=True)
        lines.append(json.dumps({"ensemble": spec}, ensure_ascii=False))
    generation = continuation.generation
    for step, (token, text, log_prob, weights) in enumerate(
        zip(
            generation.token_ids,
            continuation.tokens,
            generation.token_log_probs,
            generation.weights,
            strict=True,
        )
    ):
        record = {
            "step": step,
            "token_id": token,
            "token": text,
            "log_prob": log_prob,
            "weights": dict(zip(continuation.members, weights, strict=True)),
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    return "".join(line + "\n" for line in lines)
