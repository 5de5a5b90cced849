"""Text generation from an ensemble of experts, mixed with a domain posterior.

At every step the next-token distribution is the posterior-weighted mixture of the experts'
distributions, `p(x | x_<t) = sum_j p_j(x | x_<t) P(j | x_<t)`, and the posterior is updated
with the token that was chosen (prompt tokens included), exactly as in evaluation
(`hdee.ensemble`). Each expert keeps its own KV cache, so a step costs one token per expert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from hdee.ensemble import POSTERIOR_MODES, PosteriorMode
from hdee.layout import RunLayout
from hdee.records import EvaluationResults, Plan
from hdee.scoring import device_of, inference_autocast, load_expert, resolve_device


@dataclass
class Generation:
    """What `generate_ids` produced."""

    token_ids: list[int]  # the new tokens only
    token_log_probs: list[float] = field(default_factory=list)  # mixture log-prob of each
    posterior: list[float] = field(default_factory=list)  # P(j | everything), after the last


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
) -> Generation:
    """Continue `input_ids` with the posterior-weighted mixture of `models`.

    `prior` is P(j) (None: uniform); `posterior` is "prefix" (P(j) times the likelihood of the
    whole sequence so far) or "updating" (P(j) times the last token's likelihood only).
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
    log_prior = _normalised_log_prior(prior, len(models))
    generator = torch.Generator().manual_seed(seed)
    device = device_of(models[0])
    prompt = torch.tensor([list(input_ids)], dtype=torch.long, device=device)

    # Prompt: one forward per expert fills its KV cache; the prompt's own tokens (after the
    # first, which nothing predicts) are evidence for the posterior.
    caches: list[Any] = []
    next_lp: list[Tensor] = []  # each expert's log p_j(. | sequence so far), [V] float64
    evidence = torch.zeros(len(models), dtype=torch.float64)
    for j, model in enumerate(models):
        with inference_autocast(device):
            out = model(input_ids=prompt, use_cache=True)
        lp = torch.log_softmax(out.logits[0].double(), dim=-1)  # [L, V]
        # The model's own Cache object (a DynamicCache), passed back as is: transformers
        # removes the `past_key_values` argument and legacy tuple caches (5.40).
        caches.append(out.cache)
        next_lp.append(lp[-1].cpu())
        if prompt.shape[1] > 1:
            token_lp = lp[:-1].gather(1, prompt[0, 1:, None]).squeeze(1).cpu()
            evidence[j] = token_lp.sum() if posterior == "prefix" else token_lp[-1]

    generation = Generation(token_ids=[])
    for _ in range(max_new_tokens):
        log_weights = log_prior + evidence
        log_weights = log_weights - torch.logsumexp(log_weights, dim=0)
        mixture = torch.logsumexp(torch.stack(next_lp) + log_weights[:, None], dim=0)  # [V]
        token = _choose(mixture, greedy, temperature, top_k, generator)
        generation.token_ids.append(token)
        generation.token_log_probs.append(float(mixture[token]))
        chosen = torch.stack([lp[token] for lp in next_lp])
        evidence = evidence + chosen if posterior == "prefix" else chosen
        if token == eos_token_id:
            break
        step = torch.tensor([[token]], dtype=torch.long, device=device)
        for j, model in enumerate(models):
            with inference_autocast(device):
                out = model(input_ids=step, cache=caches[j], use_cache=True)
            caches[j] = out.cache
            next_lp[j] = torch.log_softmax(out.logits[0, -1].double(), dim=-1).cpu()

    final = log_prior + evidence
    generation.posterior = torch.softmax(final, dim=0).tolist()
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
    """The continuation (new text only) of `prompt` by the ensemble of `experts`.

    The prompt is preceded by the EOS token, which separates documents in hdee's training data,
    so the experts read it as the start of a document.
    """
    eos = tokenizer.eos_token_id
    input_ids = ([eos] if eos is not None else []) + tokenizer.encode(
        prompt, add_special_tokens=False
    )
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
    )
    return tokenizer.decode(generation.token_ids, skip_special_tokens=True)


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
    if prior is None or set(prior) != set(ensemble):
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
    plan = Plan.read(layout.plan)
    iteration, ensemble = plan.ensemble(configuration, iteration)
    dirs = ensemble_dirs(layout, ensemble)
    if prior_domain is not None:
        if kwargs.get("prior") is not None:
            raise ValueError("give a prior or a prior domain, not both")
        kwargs["prior"] = cached_prior_from_run(
            layout, configuration, iteration, ensemble, prior_domain
        )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(layout.tokenizer)
    return generate(dirs, tokenizer, prompt, **kwargs)
