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

With routing (`config.routing = {"top_k": K, "route_tokens": N}`, K below the number of
experts; hdee.routing's `prefix` rule): positions t < N mix every expert; at t = N each sequence
keeps the K experts with the highest w_j(N), and for t >= N the weights are w_j(t) restricted to
the kept experts and renormalised over them (zero elsewhere). Positions count real tokens.

For incremental decoding the cache (`HdeeEnsembleCache`) carries each expert's own KV cache
and, per sequence, each expert's running evidence, its log-distribution at the last position
(the next token's log-probability is read from it), whether the last token was real, and the
experts it kept (all, until it routed). An expert that every sequence of the batch routed away
no longer runs: its KV cache stays where it stopped, since nothing reads it again.
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
    routing:   {"top_k": None} (every member mixes at every position), or
               {"top_k": K, "route_tokens": N}: after N tokens keep the top K (prefix routing)
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
        routing = _checked_routing(routing, len(experts))
        self.experts = experts
        self.posterior = posterior
        self.prior = prior
        self.prior_source = prior_source
        self.routing = routing
        self.hdee = dict(hdee or {})
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


def _checked_routing(routing: dict[str, Any] | None, count: int) -> dict[str, Any]:
    """`routing` with its keys checked: {"top_k": None} or {"top_k": K, "route_tokens": N}."""
    routing = dict(routing or {"top_k": None})
    top_k = routing.get("top_k")
    if top_k is None:
        return {"top_k": None}
    route_tokens = routing.get("route_tokens")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or (count and not 1 <= top_k <= count):
        raise ValueError(
            f"routing.top_k must be an integer in 1..{count} (the experts), got {top_k!r}"
        )
    if isinstance(route_tokens, bool) or not isinstance(route_tokens, int) or route_tokens < 1:
        raise ValueError(f"routing.route_tokens must be an integer >= 1, got {route_tokens!r}")
    return {"top_k": top_k, "route_tokens": route_tokens}


def _shifted(log_weight: Tensor, total: Tensor) -> Tensor:
    """log_weight - total as float32, -inf where the weight is zero (also when total is -inf:
    no expert with weight has been mixed at that position yet)."""
    return torch.where(torch.isneginf(log_weight), log_weight, log_weight - total).float()


class HdeeEnsembleCache(Cache):
    """Per-expert KV caches plus the posterior's running state, one row per sequence.

    evidence  [B, E] float64: the sum (prefix) or last (updating) of each expert's
              log-probabilities of the real tokens seen so far
    next_log_probs [E, B, V] float32: each expert's log-distribution after the last token
    last_real [B] bool: whether the last token was real (not padding)
    kept      [B, E] bool: the experts each sequence mixes (all of them until it routed)
    routed    [B] bool: whether the sequence has routed
    """

    is_compileable = False

    def __init__(
        self,
        expert_caches: list[Any],
        evidence: Tensor,
        next_log_probs: Tensor,
        last_real: Tensor,
        kept: Tensor,
        routed: Tensor,
    ) -> None:
        # Deliberately no Cache.__init__: this is a container of caches (as EncoderDecoderCache).
        self.expert_caches = expert_caches
        self.evidence = evidence
        self.next_log_probs = next_log_probs
        self.last_real = last_real
        self.kept = kept
        self.routed = routed

    def __len__(self) -> int:
        return len(self.expert_caches[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(experts={len(self.expert_caches)}, tokens={self.get_seq_length()})"

    def _running_cache(self) -> Any:
        """A cache that has seen every token: an expert some sequence still mixes (a routed-away
        expert's cache stops growing)."""
        running = self.kept.any(dim=0)
        return self.expert_caches[int(running.nonzero()[0, 0]) if running.any() else 0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._running_cache().get_seq_length(layer_idx)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self._running_cache().get_max_length(layer_idx)

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
        self.kept = select(self.kept, 0)
        self.routed = select(self.routed, 0)

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
        count = len(self.experts)
        top_k, route_tokens = (
            self.config.routing.get("top_k"),
            self.config.routing.get("route_tokens"),
        )
        routing = top_k is not None and top_k < count

        # Routing state per row: kept [B, E] and routed [B] before this chunk; route_at [B] is
        # the chunk index where a row routes (its real token at position N), `length` if not here.
        if cache is not None:
            kept, routed = cache.kept.to(device), cache.routed.to(device)
        else:
            kept = torch.ones(batch, count, dtype=torch.bool, device=device)
            routed = torch.zeros(batch, dtype=torch.bool, device=device)
        indices = torch.arange(length, device=device)
        route_at = torch.full((batch,), length, dtype=torch.long, device=device)
        if routing:
            at_n = real & (position_ids.to(device) == route_tokens) & ~routed[:, None]
            route_at = torch.where(at_n.any(dim=1), at_n.long().argmax(dim=1), route_at)
            route_at = torch.where(routed, torch.zeros_like(route_at), route_at)
            # A row routing on this chunk's first token needs only the cached evidence (x_N's
            # log-probability was predicted before): route it now, so its routed-away experts
            # need not read x_N at all (as `hdee generate` does).
            first = ~routed & (route_at == 0)
            if cache is not None and first.any():
                token_lp = (
                    cache.next_log_probs.to(device)
                    .gather(2, input_ids[None, :, :1].expand(count, -1, -1))[..., 0]
                    .double()
                    .T
                )  # [B, E]
                evidence0 = torch.stack(
                    [
                        self._evidence(
                            token_lp[:, j : j + 1], counted[:, :1], cache.evidence[:, j].to(device)
                        )[:, 0]
                        for j in range(count)
                    ],
                    dim=1,
                )
                kept = torch.where(first[:, None], self._top_k(log_prior + evidence0, top_k), kept)
                routed = routed | first
        # Mixing waits for every expert when a row routes inside the chunk (the kept set needs
        # every expert's evidence at N); otherwise each expert is mixed as soon as it has run.
        deferred = bool((route_at[~routed] < length).any()) if routing else False
        # An expert runs unless every row has routed and none kept it.
        needed = (~routed[:, None] | kept).any(dim=0).tolist()
        after = indices[None, :] >= route_at[:, None]  # [B, L]: positions that mix kept experts

        # With a_j the unnormalised log-weight of expert j and Z = logsumexp_j a_j, the mixture
        # is logsumexp_j (a_j - Z + lp_j), accumulated expert by expert against the running Z so
        # every term stays a log-weight <= 0 and float32 keeps it exact to ~1e-7 (a_j alone
        # reaches thousands on long prefixes). A routed-away expert's a_j is -inf.
        mixture: Tensor | None = None
        normaliser: Tensor | None = None
        pending: list[tuple[int, Tensor, Tensor]] = []
        evidences: list[Tensor | None] = [None] * count
        new_caches: list[Any] = list(cache.expert_caches) if cache is not None else [None] * count
        new_evidence = cache.evidence.to(device).clone() if cache is not None else None
        next_lps: list[Tensor | None] = (
            list(cache.next_log_probs.to(device).unbind(0)) if cache is not None else [None] * count
        )

        def mix(j: int, log_probs: Tensor, evidence: Tensor) -> None:
            nonlocal mixture, normaliser
            weight = log_prior[j] + evidence[:, -keep:]  # [B, keep] float64
            if routing:
                away = after[:, -keep:] & ~kept[:, j : j + 1]
                weight = weight.masked_fill(away, -torch.inf)
            if mixture is None or normaliser is None:
                mixture, normaliser = log_probs, weight
                return
            total = torch.logaddexp(normaliser, weight)
            mixture = torch.logaddexp(
                mixture + _shifted(normaliser, total)[..., None],
                log_probs + _shifted(weight, total)[..., None],
            )
            normaliser = total

        for j, expert in enumerate(self.experts):
            if not needed[j]:
                continue  # routed away by every row: it never runs again
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
            evidences[j] = evidence
            if deferred:
                pending.append((j, log_probs[:, -keep:], evidence))
            else:
                mix(j, log_probs[:, -keep:], evidence)
            if use_cache:
                new_caches[j] = getattr(out, OUTPUT_CACHE_FIELD)
                if new_evidence is None:
                    new_evidence = torch.zeros(batch, count, dtype=torch.float64, device=device)
                new_evidence[:, j] = evidence[:, -1]
                next_lps[j] = log_probs[:, -1]
        if deferred:
            # A row routes here, so every expert ran on this chunk.
            assert top_k is not None
            here = ~routed & (route_at < length)
            at = route_at.clamp(max=length - 1)[:, None]
            weights_at_n = torch.stack(
                [
                    log_prior[j] + e.gather(1, at)[:, 0]
                    for j, e in enumerate(evidences)
                    if e is not None
                ],
                dim=1,
            )
            kept = torch.where(here[:, None], self._top_k(weights_at_n, top_k), kept)
            routed = routed | here
            for j, log_probs, evidence in pending:
                mix(j, log_probs, evidence)
        assert mixture is not None

        new_cache = None
        if use_cache:
            assert new_evidence is not None
            new_cache = HdeeEnsembleCache(
                new_caches,
                new_evidence,
                torch.stack([lp for lp in next_lps if lp is not None]),  # every expert ran once
                real[:, -1],
                kept,
                routed,
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

    @staticmethod
    def _top_k(log_weights: Tensor, k: int) -> Tensor:
        """[B, E] boolean: each row's k largest weights (ties: as torch.topk; hdee.routing's
        `top_k_mask`)."""
        index = torch.topk(log_weights, k, dim=-1).indices
        return torch.zeros_like(log_weights, dtype=torch.bool).scatter_(-1, index, True)

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
