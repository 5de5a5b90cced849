"""Text generation from an ensemble of experts, mixed with a domain posterior.

At every step the next-token distribution is the posterior-weighted mixture of the experts'
distributions, `p(x | x_<t) = sum_j p_j(x | x_<t) P(j | x_<t)`, and the posterior is updated
with the token that was chosen (prompt tokens included), exactly as in evaluation
(`hdee.ensemble`). Each expert keeps its own KV cache, so a step costs one token per expert.
With routing (`experts=K`, `hdee.routing`), every expert reads the first `route_tokens` tokens,
then only the K with the highest posterior keep running: a step costs one token per kept expert.
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
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from hdee.atomic import read_json
from hdee.config import UsageError
from hdee.ensemble import POSTERIOR_MODES, PosteriorMode
from hdee.layout import RunLayout
from hdee.records import EvaluationResults, Plan
from hdee.routing import Members, ensemble_members, top_k_mask
from hdee.scoring import device_of, inference_autocast, load_expert, resolve_device


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


def _normalised_log_prior(prior: Sequence[float] | Tensor | None, experts: int) -> Tensor:
    if prior is None:
        return torch.full((experts,), -math.log(experts), dtype=torch.float64)
    probs = torch.as_tensor(prior, dtype=torch.float64).flatten()
    if probs.shape[0] != experts or (probs < 0).any() or probs.sum() <= 0:
        raise ValueError(f"prior must be {experts} non-negative weights, got {prior}")
    return (probs / probs.sum()).log()


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


class _Experts:
    """The experts' decoding state: a KV cache, the next-token log-probs and the posterior
    evidence of each expert still running. Routing (`hdee.routing`, the same rule as
    evaluation) happens once every expert has read `route_tokens` tokens and the next token is
    known: the top `experts` of the posterior keep running, the others never run again."""

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        posterior: PosteriorMode,
        log_prior: Tensor,
        experts: int | None,
        route_tokens: int,
    ) -> None:
        self.models = models
        self.posterior = posterior
        self.log_prior = log_prior
        self.device = device_of(models[0])
        count = len(models)
        self.active = list(range(count))
        self.caches: list[Any] = [None] * count
        self.next_lp: list[Tensor | None] = [None] * count  # log p_j(. | sequence so far), [V]
        self.evidence = torch.zeros(count, dtype=torch.float64)
        self.tokens_run = [0] * count
        self.read = 0  # tokens every running expert has read
        self.experts = experts
        self.route_tokens = route_tokens
        self.pending = experts is not None and experts < count
        self.routed_at: int | None = None

    def credit(self, token: int) -> None:
        """Evidence of a known token from the predictions made before it."""
        for j in self.active:
            lp = self.next_lp[j]
            assert lp is not None
            self.evidence[j] = (
                self.evidence[j] + lp[token] if self.posterior == "prefix" else lp[token]
            )

    def _read(self, tokens: list[int], credit_first: bool) -> None:
        if credit_first:
            self.credit(tokens[0])
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        for j in self.active:
            with inference_autocast(self.device):
                out = self.models[j](input_ids=ids, cache=self.caches[j], use_cache=True)
            # The model's own Cache object (a DynamicCache), passed back as is: transformers
            # removes the `past_key_values` argument and legacy tuple caches (5.40).
            self.caches[j] = out.cache
            lp = torch.log_softmax(out.logits[0].double(), dim=-1).cpu()  # [L, V]
            if len(tokens) > 1:
                token_lp = lp[:-1].gather(1, ids[0, 1:, None].cpu()).squeeze(1)
                self.evidence[j] = (
                    self.evidence[j] + token_lp.sum()
                    if self.posterior == "prefix"
                    else token_lp[-1]
                )
            self.next_lp[j] = lp[-1]
            self.tokens_run[j] += len(tokens)
        self.read += len(tokens)

    def _route(self) -> None:
        assert self.experts is not None
        kept = top_k_mask(self.log_prior + self.evidence, self.experts)
        self.active = [j for j in self.active if kept[j]]
        for j in range(len(self.models)):
            if not kept[j]:  # routed away: its cache is freed and it never runs again
                self.caches[j] = None
                self.next_lp[j] = None
        self.pending = False
        self.routed_at = self.read

    def advance(self, tokens: list[int], credit_first: bool) -> None:
        """Read known tokens (the prompt, or a chosen token), routing on the way when due."""
        if self.pending:
            head = tokens[: max(0, self.route_tokens - self.read)]
            if head:
                self._read(head, credit_first)
                credit_first, tokens = True, tokens[len(head) :]
            if self.read >= self.route_tokens and tokens:
                # Every expert has read r tokens and x_r is known: its evidence completes the
                # routing posterior (as P(j | x_<r) in evaluation), then the kept ones read it.
                self.credit(tokens[0])
                self._route()
                self._read(tokens, credit_first=False)
                return
        if tokens:
            self._read(tokens, credit_first)

    def log_weights(self) -> Tensor:
        """log P(j | sequence so far) `[E]`, renormalised over the running experts."""
        masked = torch.full_like(self.log_prior, -math.inf)
        masked[self.active] = self.log_prior[self.active] + self.evidence[self.active]
        return masked - torch.logsumexp(masked, dim=0)


@torch.inference_mode()
def generate_ids(
    models: Sequence[torch.nn.Module],
    input_ids: Sequence[int],
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    posterior: PosteriorMode = "prefix",
    prior: Sequence[float] | Tensor | None = None,
    eos_token_id: int | None = None,
    experts: int | None = None,
    route_tokens: int = 32,
) -> Generation:
    """Continue `input_ids` with the posterior-weighted mixture of `models`.

    `prior` is P(j) (None: uniform); `posterior` is "prefix" (P(j) times the likelihood of the
    whole sequence so far) or "updating" (P(j) times the last token's likelihood only).
    `experts` K < len(models) routes: every expert reads the first `route_tokens` tokens
    (prompt first, then generated ones), then only the K with the highest posterior keep
    running, from their KV caches, with the posterior renormalised over them (`hdee.routing`).
    Stops after `max_new_tokens` or at `eos_token_id` (which is kept in the output).
    """
    if not models:
        raise ValueError("need at least one expert")
    if not input_ids:
        raise ValueError("need at least one input token (e.g. the EOS that starts a document)")
    if posterior not in POSTERIOR_MODES:
        raise ValueError(f"unknown posterior mode {posterior!r}, expected one of {POSTERIOR_MODES}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if experts is not None and not 1 <= experts <= len(models):
        raise ValueError(f"--experts must be in 1..{len(models)} (the members), got {experts}")
    if route_tokens < 1:
        raise ValueError(f"--route-tokens must be >= 1, got {route_tokens}")
    log_prior = _normalised_log_prior(prior, len(models))
    generator = torch.Generator().manual_seed(seed)
    state = _Experts(models, posterior, log_prior, experts, route_tokens)
    # The prompt's own tokens (after the first, which nothing predicts) are evidence.
    state.advance(list(input_ids), credit_first=False)

    generation = Generation(token_ids=[])
    for step in range(max_new_tokens):
        log_weights = state.log_weights()
        running = list(state.active)
        next_lp = torch.stack([state.next_lp[j] for j in running])  # type: ignore[misc]
        mixture = torch.logsumexp(next_lp + log_weights[running, None], dim=0)  # [V]
        token = _choose(mixture, greedy, temperature, top_k, generator)
        generation.token_ids.append(token)
        generation.token_log_probs.append(float(mixture[token]))
        generation.weights.append(log_weights.exp().tolist())
        if token == eos_token_id or step == max_new_tokens - 1:
            # The final posterior includes the last token; no expert needs to read it.
            state.credit(token)
            break
        state.advance([token], credit_first=True)

    generation.posterior = state.log_weights().exp().tolist()
    generation.tokens_run = list(state.tokens_run)
    generation.kept = list(state.active)
    generation.routed_at = state.routed_at
    return generation


def load_models(
    experts: Sequence[str | Path | PreTrainedModel], device: torch.device | None = None
) -> list[torch.nn.Module]:
    """Models from HF directories (safetensors only) or already-loaded models, on one device."""
    device = device or resolve_device()
    models = []
    for expert in experts:
        if isinstance(expert, (str, Path)):
            expert = load_expert(Path(expert), device)
        models.append(expert.to(device).eval())
    return models


@dataclass
class Continuation:
    """A generated continuation with what produced it (for the CLI's summary and JSON lines)."""

    text: str
    generation: Generation
    members: list[str]  # the experts' names, in the order of `generation.weights`
    tokens: list[str]  # each new token as text


def generate_continuation(
    experts: Sequence[str | Path | PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    posterior: PosteriorMode = "prefix",
    prior: Sequence[float] | Tensor | None = None,
    stop_at_eos: bool = True,
    routed_experts: int | None = None,
    route_tokens: int = 32,
    names: Sequence[str] | None = None,
) -> Continuation:
    """The continuation of `prompt` by the ensemble of `experts` (`routed_experts` K: only the
    top K after `route_tokens` tokens keep running), with its per-token expert weights.

    The prompt is preceded by the EOS token, which separates documents in hdee's training data,
    so the experts read it as the start of a document.
    """
    eos = tokenizer.eos_token_id
    input_ids = ([eos] if eos is not None else []) + tokenizer.encode(
        prompt, add_special_tokens=False
    )
    check_generation_fits(experts, len(input_ids), max_new_tokens)  # before any model loads
    generation = generate_ids(
        load_models(experts),
        input_ids,
        max_new_tokens,
        greedy,
        temperature,
        top_k,
        seed,
        posterior,
        prior,
        eos if stop_at_eos else None,
        experts=routed_experts,
        route_tokens=route_tokens,
    )
    return Continuation(
        text=tokenizer.decode(generation.token_ids, skip_special_tokens=True),
        generation=generation,
        members=list(names) if names is not None else [str(j) for j in range(len(experts))],
        tokens=[tokenizer.decode([token]) for token in generation.token_ids],
    )


def check_generation_fits(
    experts: Sequence[str | Path | PreTrainedModel], prompt_tokens: int, max_new_tokens: int
) -> None:
    """Refuse (UsageError: exit 2) a generation that reads past the experts' context,
    `max_position_embeddings` of their configs (the training sequence length): past it a
    model reads positions it never trained on, and a typo (100000000) would run for days.
    The experts read the prompt (`prompt_tokens`, with the EOS hdee puts before it) and every
    new token but the last. Reads config.json only, before any model loads."""
    contexts: dict[str, int] = {}
    for expert in experts:
        if isinstance(expert, (str, Path)):
            path = Path(expert) / "config.json"
            contexts[str(path)] = int(read_json(path)["max_position_embeddings"])
        else:
            contexts[type(expert).__name__] = int(expert.config.max_position_embeddings)
    if not contexts:
        return
    source, context = min(contexts.items(), key=lambda item: item[1])
    limit = context - prompt_tokens + 1
    if limit < 1:
        raise UsageError(
            f"--prompt: {prompt_tokens} tokens (with the EOS before it) are more than the "
            f"experts' context of {context} positions (max_position_embeddings in {source})"
        )
    if max_new_tokens > limit:
        raise UsageError(
            f"--max-new-tokens {max_new_tokens}: must be in 1..{limit}: the experts read the "
            f"prompt ({prompt_tokens} tokens with the EOS before it) and every new token but the "
            f"last, at most {context} positions (max_position_embeddings in {source})"
        )


def generate(
    experts: Sequence[str | Path | PreTrainedModel],
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    posterior: PosteriorMode = "prefix",
    prior: Sequence[float] | Tensor | None = None,
    stop_at_eos: bool = True,
) -> str:
    """The continuation (new text only) of `prompt` by the ensemble of `experts`."""
    return generate_continuation(
        experts,
        tokenizer,
        prompt,
        max_new_tokens,
        greedy,
        temperature,
        top_k,
        seed,
        posterior,
        prior,
        stop_at_eos,
    ).text


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
    """One JSON line per new token: its step, id, text, mixture log-prob and each expert's
    weight P(j | x_<t) when it was chosen (for attribution)."""
    lines = []
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


def ensemble_dirs(layout: RunLayout, ensemble: dict[str, str]) -> list[Path]:
    """Model directories of an ensemble ({lane: job id}), in its lane order."""
    dirs = [layout.job(job_id).final for job_id in ensemble.values()]
    for model_dir in dirs:
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: expert not trained yet")
    return dirs


def cached_prior_from_run(
    layout: RunLayout, configuration: str, iteration: int, ensemble: dict[str, str], domain: str
) -> list[float]:
    """The cached prior `hdee evaluate` estimated for this ensemble on `domain`'s validation
    text, in the ensemble's lane order: generation weighted as if the text were from `domain`."""
    path = layout.results
    results = EvaluationResults.read(path)
    entry = results.configurations.get(configuration)
    evaluated = entry.iterations.get(iteration) if entry else None
    domains = evaluated.domains if evaluated else {}
    if domain not in domains:
        raise ValueError(
            f"{path}: no results for {configuration!r} iteration {iteration} on domain "
            f"{domain!r}; domains evaluated: {sorted(domains) or 'none'}"
        )
    prior = domains[domain].cached_prior
    if prior is not None and set(prior) != set(ensemble):
        raise ValueError(
            f"{path}: the cached prior of {configuration!r} on {domain!r} weighs the experts "
            f"{sorted(prior)}, not these members {sorted(ensemble)}: run `hdee evaluate` with "
            "the same evaluation.members (latest | all) as --members"
        )
    if prior is None:
        raise ValueError(
            f"{path}: no cached prior for {configuration!r} on {domain!r} (add cached_prior to "
            "evaluation.methods and run `hdee evaluate` again)"
        )
    return [float(prior[lane]) for lane in ensemble]


def generate_from_run(
    layout: RunLayout,
    configuration: str,
    prompt: str,
    iteration: int | None = None,
    prior_domain: str | None = None,
    **kwargs: Any,
) -> str:
    """`generate` with a run's tokenizer and a configuration's ensemble (default: after its
    last iteration); with `prior_domain`, the experts are weighted by the cached prior of that
    domain (else by `prior=` or uniformly)."""
    return continue_from_run(layout, configuration, prompt, iteration, prior_domain, **kwargs).text


def continue_from_run(
    layout: RunLayout,
    configuration: str,
    prompt: str,
    iteration: int | None = None,
    prior_domain: str | None = None,
    members: Members = "latest",
    **kwargs: Any,
) -> Continuation:
    """`generate_from_run` with its per-token weights; `members` "all" generates from the
    growing forest (every expert of every lane and iteration), `routed_experts` K routes."""
    plan = Plan.read(layout.plan)
    iteration, ensemble = ensemble_members(plan, configuration, iteration, members)
    dirs = ensemble_dirs(layout, ensemble)
    if prior_domain is not None:
        if kwargs.get("prior") is not None:
            raise ValueError("give a prior or a prior domain, not both")
        kwargs["prior"] = cached_prior_from_run(
            layout, configuration, iteration, ensemble, prior_domain
        )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(layout.tokenizer)
    return generate_continuation(dirs, tokenizer, prompt, names=list(ensemble), **kwargs)
