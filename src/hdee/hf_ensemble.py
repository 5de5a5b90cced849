"""An hdee ensemble as one transformers model: E Llama experts mixed with a domain posterior.

This file is copied verbatim into every `hdee export` directory as `modeling_hdee.py` and named
in its `config.json`'s `auto_map`, so it must import nothing but torch and transformers: the
export then loads on a machine without hdee, with

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)

`forward` returns, as `logits`, the log of the ensemble's next-token distribution over the
whole vocabulary at every position t (DESIGN.md, "Ensembling with a domain posterior"):

    logits[t] = log sum_j w_j(t) softmax(l_j(t))
    prefix:   w_j(t) ∝ P(j) * prod_{1<=s<=t} p_j(x_s | x_<s)
    updating: w_j(t) ∝ P(j) * p_j(x_t | x_<t)          (P(j) while nothing is evidence yet)

so `log_softmax(logits) == logits` and every tool that reads logits (lm-evaluation-harness,
pipelines, `generate`) sees the ensemble's distribution. A token is evidence only when it and
the token before it are real (attention mask 1): left padding never moves the posterior.

For incremental decoding the cache (`HdeeEnsembleCache`) carries each expert's own KV cache
and, per sequence, each expert's running evidence, its log-distribution at the last position
(the next token's log-probability is read from it) and whether the last token was real.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, LlamaConfig, LlamaForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

POSTERIOR_MODES = ("prefix", "updating")
# transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a warning).
CACHE_ARGUMENT = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)
OUTPUT_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


class HdeeEnsembleConfig(PretrainedConfig):
    """The members (each with its Llama config), posterior mode and prior of an ensemble.

    experts:   [{"name", "lane", "iteration", "job_id", "llama": LlamaConfig dict}, ...]
    posterior: "prefix" (HDEE) or "updating" (BTM/DEMix code)
    prior:     P(j), one non-negative weight per expert (normalised here); None: uniform
    prior_source: where the prior came from ("uniform", "cached:DOMAIN", "explicit")
    routing:   {"top_k": None} (every member mixes at every position)
    hdee:      provenance (run directory, configuration, iteration, members)
    """

    model_type = "hdee_ensemble"

    def __init__(
        self,
        experts: list[dict[str, Any]] | None = None,
        posterior: str = "prefix",
        prior: list[float] | None = None,
        prior_source: str = "uniform",
        routing: dict[str, Any] | None = None,
        hdee: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        experts = list(experts or [])
        if posterior not in POSTERIOR_MODES:
            raise ValueError(f"posterior must be one of {POSTERIOR_MODES}, got {posterior!r}")
        if experts:
            count = len(experts)
            if prior is None:
                prior = [1.0 / count] * count
            weights = [float(w) for w in prior]
            if len(weights) != count or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"prior must be {count} non-negative weights, got {prior}")
            prior = [w / sum(weights) for w in weights]
            llama = [expert["llama"] for expert in experts]
            vocab = {c["vocab_size"] for c in llama}
            if len(vocab) != 1:
                raise ValueError(f"experts must share one vocabulary, got sizes {sorted(vocab)}")
            kwargs.setdefault("vocab_size", vocab.pop())
            kwargs.setdefault(
                "max_position_embeddings", min(c["max_position_embeddings"] for c in llama)
            )
            for key in ("bos_token_id", "eos_token_id"):
                kwargs.setdefault(key, llama[0].get(key))
        routing = dict(routing or {"top_k": None})
        if routing.get("top_k") is not None:
            raise ValueError("top-K routing is not yet supported by the exported model")
        self.experts = experts
        self.posterior = posterior
        self.prior = prior
        self.prior_source = prior_source
        self.routing = routing
        self.hdee = dict(hdee or {})
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class HdeeEnsembleCache(Cache):
    """Per-expert KV caches plus the posterior's running state, one row per sequence.

    evidence  [B, E] float64: the sum (prefix) or last (updating) of each expert's
              log-probabilities of the real tokens seen so far
    next_log_probs [E, B, V] float32: each expert's log-distribution after the last token
    last_real [B] bool: whether the last token was real (not padding)
    """

    is_compileable = False

    def __init__(
        self, expert_caches: list[Any], evidence: Tensor, next_log_probs: Tensor, last_real: Tensor
    ) -> None:
        # Deliberately no Cache.__init__: this is a container of caches (as EncoderDecoderCache).
        self.expert_caches = expert_caches
        self.evidence = evidence
        self.next_log_probs = next_log_probs
        self.last_real = last_real

    def __len__(self) -> int:
        return len(self.expert_caches[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(experts={len(self.expert_caches)}, tokens={self.get_seq_length()})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.expert_caches[0].get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.expert_caches[0].get_max_length(layer_idx)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_croppable(self) -> bool:
        return False  # the posterior's evidence cannot be rolled back token by token

    def _rows(self, select: Any) -> None:
        self.evidence = select(self.evidence, 0)
        self.next_log_probs = select(self.next_log_probs, 1)
        self.last_real = select(self.last_real, 0)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for cache in self.expert_caches:
            cache.batch_repeat_interleave(repeats)
        self._rows(lambda t, dim: t.repeat_interleave(repeats, dim=dim))

    def batch_select_indices(self, indices: Tensor) -> None:
        for cache in self.expert_caches:
            cache.batch_select_indices(indices)
        self._rows(lambda t, dim: t.index_select(dim, indices.to(t.device)))

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for cache in self.expert_caches:
            cache.reorder_cache(beam_idx)
        self._rows(lambda t, dim: t.index_select(dim, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("an hdee ensemble cache cannot be cropped")

    def reset(self) -> None:
        raise NotImplementedError("an hdee ensemble cache cannot be reset; start a new one")


class HdeeEnsembleForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HdeeEnsembleConfig
    base_model_prefix = "hdee_ensemble"
    main_input_name = "input_ids"
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: HdeeEnsembleConfig) -> None:
        super().__init__(config)
        if not config.experts:
            raise ValueError("an ensemble config needs at least one expert")
        self.experts = nn.ModuleList(
            LlamaForCausalLM(LlamaConfig(**expert["llama"])) for expert in config.experts
        )
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not hand forward a plain DynamicCache: forward builds its own cache.
        return False

    def _init_weights(self, module: nn.Module) -> None:
        # Every weight comes from the experts' checkpoints; nothing is initialised here.
        pass

    def get_input_embeddings(self) -> nn.Module:
        return self.experts[0].get_input_embeddings()

    def get_output_embeddings(self) -> None:
        return None  # one head per expert; there is no single output embedding to tie

    @property
    def log_prior(self) -> Tensor:
        return torch.tensor(self.config.prior, dtype=torch.float64).log()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: HdeeEnsembleCache | None = None,
        past_key_values: HdeeEnsembleCache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """`logits` [B, L, V]: log of the ensemble's next-token distribution at every position
        (at the last `logits_to_keep` positions only, when it is > 0: generation needs one).

        `attention_mask` [B, past + L] marks real tokens (1) and padding (0); padding is never
        evidence for the posterior, and positions are counted over real tokens only.
        """
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, HdeeEnsembleCache):
            if cache.get_seq_length() != 0:
                raise ValueError(f"expected an HdeeEnsembleCache, got {type(cache).__name__}")
            cache = None  # an empty cache some caller made: start ours instead
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        batch, length = input_ids.shape
        device = input_ids.device
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=device)
        if position_ids is None:
            # Real tokens count positions from 0, whatever padding stands before them.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        real = attention_mask[:, -length:].bool()
        if cache is not None:
            before_real = torch.cat([cache.last_real[:, None].to(device), real[:, :-1]], dim=1)
        else:
            before_real = torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
        counted = real & before_real  # [B, L]: token t is evidence
        keep = length if not logits_to_keep else min(int(logits_to_keep), length)
        log_prior = self.log_prior.to(device)

        # One pass over the experts. With a_j the unnormalised log-weight of expert j and
        # Z = logsumexp_j a_j, the mixture is logsumexp_j (a_j - Z + lp_j), accumulated
        # expert by expert against the running Z so every term stays a log-weight <= 0 and
        # float32 keeps it exact to ~1e-7 (a_j alone reaches thousands on long prefixes).
        mixture: Tensor | None = None
        normaliser: Tensor | None = None
        new_caches, new_evidence, next_lps = [], [], []
        for j, expert in enumerate(self.experts):
            out = expert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_ARGUMENT: cache.expert_caches[j] if cache is not None else None},
            )
            log_probs = torch.log_softmax(out.logits.float(), dim=-1)  # [B, L, V]
            token_lp = torch.zeros(batch, length, dtype=torch.float64, device=device)
            if length > 1:
                token_lp[:, 1:] = (
                    log_probs[:, :-1].gather(2, input_ids[:, 1:, None])[..., 0].double()
                )
            if cache is not None:
                previous = cache.next_log_probs[j].to(device)
                token_lp[:, 0] = previous.gather(1, input_ids[:, :1])[:, 0].double()
            evidence = self._evidence(
                token_lp, counted, cache.evidence[:, j].to(device) if cache is not None else None
            )
            weight = log_prior[j] + evidence[:, -keep:]  # [B, keep] float64
            if mixture is None or normaliser is None:
                mixture, normaliser = log_probs, weight
            else:
                total = torch.logaddexp(normaliser, weight)
                mixture = torch.logaddexp(
                    mixture + (normaliser - total).float()[..., None],
                    log_probs + (weight - total).float()[..., None],
                )
                normaliser = total
            if use_cache:
                new_caches.append(getattr(out, OUTPUT_CACHE_FIELD))
                new_evidence.append(evidence[:, -1])
                next_lps.append(log_probs[:, -1])
        assert mixture is not None

        new_cache = None
        if use_cache:
            new_cache = HdeeEnsembleCache(
                new_caches,
                torch.stack(new_evidence, dim=1),
                torch.stack(next_lps),
                real[:, -1],
            )
        loss = None
        if labels is not None:
            if keep != length:
                raise ValueError("labels need logits at every position (logits_to_keep=0)")
            loss = nn.functional.nll_loss(
                mixture[:, :-1].reshape(-1, mixture.shape[-1]),
                labels[:, 1:].reshape(-1).to(device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=mixture, **{OUTPUT_CACHE_FIELD: new_cache})

    def _evidence(self, token_lp: Tensor, counted: Tensor, before: Tensor | None) -> Tensor:
        """Each position's evidence for one expert, [B, L] float64: what its weight at that
        position uses (all counted tokens up to and including it)."""
        if self.config.posterior == "prefix":
            start = before[:, None] if before is not None else 0.0
            return start + torch.cumsum(token_lp * counted, dim=1)
        # updating: the log-probability of the latest counted token, carried forward.
        positions = torch.arange(token_lp.shape[1], device=token_lp.device).expand_as(token_lp)
        latest = torch.where(counted, positions, -1).cummax(dim=1).values
        carried = token_lp.gather(1, latest.clamp(min=0))
        start = before[:, None] if before is not None else torch.zeros_like(token_lp[:, :1])
        return torch.where(latest >= 0, carried, start.expand_as(token_lp))


def ensemble_members(config: HdeeEnsembleConfig) -> list[str]:
    """The members' names, in the order of their weights in the prior."""
    return [str(expert["name"]) for expert in config.experts]


__all__ = [
    "HdeeEnsembleCache",
    "HdeeEnsembleConfig",
    "HdeeEnsembleForCausalLM",
    "ensemble_members",
]
