"""An hdee ensemble as one transformers model: E Llama experts mixed with a domain posterior.

This is hdee's one live implementation of an ensemble: `hdee generate`, `hdee tasks`,
`hdee export` and the routed scorer of the benchmarks all run this model. `hdee evaluate`
computes the same numbers as tensor maths over cached label log-probs (`hdee.ensemble`,
`hdee.routing`); a test keeps the two equal for every ensemble spec.

The file is copied into every `hdee export` directory as `modeling_hdee.py`, next to
`selection.py` (the routing rules, imported relatively), and named in its `config.json`'s
`auto_map`, so it must import nothing but torch, transformers and that file: the export then
loads on a machine without hdee, with

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)

`forward` returns, as `logits`, the log of the ensemble's next-token distribution over the
whole vocabulary at every position t (docs/design.md, "Ensembling with a domain posterior"):

    logits[t] = log sum_j w_j(t) softmax(l_j(t))
    prefix:   w_j(t) ∝ P(j) * prod_{1<=s<=t} p_j(x_s | x_<s)
    updating: w_j(t) ∝ P(j) * p_j(x_t | x_<t)          (P(j) while nothing is evidence yet)

so `log_softmax(logits) == logits` and every tool that reads logits (lm-evaluation-harness,
pipelines, `generate`) sees the ensemble's distribution. With `label_ids` it returns instead
`label_log_probs[b, t] = log p(label_ids[b, t] | x_<=t)` without forming the mixture over the
vocabulary (what scoring needs). A token is evidence only when it and the token before it are
real (attention mask 1): left padding never moves the posterior.

Routing (`config.routing`, hdee.routing's rules; positions count real tokens):

    {"mode": "none"}                                   every expert mixes at every position
    {"mode": "prefix", "top_k": K, "route_tokens": N}  positions t < N mix every expert; at
        t = N each sequence keeps the K experts with the highest w_j(N), and for t >= N the
        weights are w_j(t) restricted to the kept experts and renormalised over them
    {"mode": "budget", "flop_budget": B, "route_tokens": N, "flops": [F_j, ...]}  the same,
        keeping the set with the most posterior mass whose summed FLOPs per token fit B
    {"mode": "prior", "top_k": K}                      the K experts with the highest prior,
        from the first token (the others never run)

Routed-away experts run no compute: an expert runs only on the rows (sequences) of a batch
that still mix it, and its KV cache keeps only those rows.

For incremental decoding the cache (`HdeeEnsembleCache`) carries each expert's own KV cache
and, per sequence, each expert's running evidence, its log-distribution at the last position
(the next token's log-probability is read from it), whether the last token was real, and the
experts it kept (all, until it routed).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, LlamaConfig, LlamaForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .selection import budget_mask, top_k_mask

POSTERIOR_MODES = ("prefix", "updating")
ROUTINGS = ("none", "prefix", "prior", "budget")
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
    """The members (each with its Llama config), posterior mode, prior and routing.

    experts:   [{"name", "lane", "iteration", "job_id", "llama": LlamaConfig dict}, ...]
    posterior: "prefix" (HDEE) or "updating" (BTM/DEMix code)
    prior:     P(j), one non-negative weight per expert (normalised here); None: uniform
    prior_source: where the prior came from (the ensemble spec's grammar: "uniform",
               "cached:DOMAIN", or the weights)
    routing:   see the module docstring ({"mode": "none"} by default)
    hdee:      provenance: the resolved ensemble spec (run directory, configuration,
               iteration, members, excluded members, ...)
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
        self.experts = experts
        self.posterior = posterior
        self.prior = prior
        self.prior_source = prior_source
        self.routing = checked_routing(routing, len(experts))
        self.hdee = dict(hdee or {})
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


def _positive_int(routing: dict[str, Any], key: str, upper: int | None = None) -> int:
    value = routing.get(key)
    bad = isinstance(value, bool) or not isinstance(value, int) or value < 1
    if bad or (upper is not None and upper and value > upper):
        allowed = f"in 1..{upper} (the experts)" if upper else ">= 1"
        raise ValueError(f"routing.{key} must be an integer {allowed}, got {value!r}")
    return value


def checked_routing(routing: dict[str, Any] | None, count: int) -> dict[str, Any]:
    """`routing` with its keys checked (module docstring). Exports of hdee before routing modes
    wrote {"top_k": None} or {"top_k": K, "route_tokens": N}: read as none and prefix."""
    routing = dict(routing or {})
    mode = routing.get("mode")
    if mode is None:
        mode = "none" if routing.get("top_k") is None else "prefix"
    if mode not in ROUTINGS:
        raise ValueError(f"routing.mode must be one of {ROUTINGS}, got {mode!r}")
    if mode == "none":
        return {"mode": "none"}
    if mode == "prior":
        return {"mode": "prior", "top_k": _positive_int(routing, "top_k", count)}
    route_tokens = _positive_int(routing, "route_tokens")
    if mode == "prefix":
        top_k = _positive_int(routing, "top_k", count)
        return {"mode": "prefix", "top_k": top_k, "route_tokens": route_tokens}
    budget, flops = routing.get("flop_budget"), routing.get("flops")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"routing.flop_budget must be a number > 0, got {budget!r}")
    if not isinstance(flops, list) or not flops or (count and len(flops) != count):
        raise ValueError(f"routing.flops must list {count} positive FLOPs per token, got {flops}")
    if min(flops) <= 0:
        raise ValueError(f"routing.flops must list {count} positive FLOPs per token, got {flops}")
    return {
        "mode": "budget",
        "flop_budget": float(budget),
        "route_tokens": route_tokens,
        "flops": [float(f) for f in flops],
    }


def _shifted(log_weight: Tensor, total: Tensor) -> Tensor:
    """log_weight - total, -inf where the weight is zero (also when total is -inf: no expert
    with weight has been mixed at that position yet)."""
    return torch.where(torch.isneginf(log_weight), log_weight, log_weight - total)


class HdeeEnsembleCache(Cache):
    """Per-expert KV caches plus the posterior's running state, one row per sequence.

    evidence  [B, E] float64: the sum (prefix) or last (updating) of each expert's
              log-probabilities of the real tokens seen so far
    next_log_probs [E, B, V] float32: each expert's log-distribution after the last token
    last_real [B] bool: whether the last token was real (not padding)
    kept      [B, E] bool: the experts each sequence mixes (all of them until it routed)
    routed    [B] bool: whether the sequence has routed
    rows      per expert, the batch rows its KV cache holds (a routed-away row leaves it)
    tokens_run [E] long: input tokens each expert has run a forward pass on
    seen      tokens (positions, padding included) every sequence has been given
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
        rows: list[Tensor],
        tokens_run: Tensor,
        seen: int,
    ) -> None:
        # Deliberately no Cache.__init__: this is a container of caches (as EncoderDecoderCache).
        self.expert_caches = expert_caches
        self.evidence = evidence
        self.next_log_probs = next_log_probs
        self.last_real = last_real
        self.kept = kept
        self.routed = routed
        self.rows = rows
        self.tokens_run = tokens_run
        self.seen = seen

    def __len__(self) -> int:
        running = [c for c in self.expert_caches if c is not None]
        return len(running[0]) if running else 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(experts={len(self.expert_caches)}, tokens={self.seen})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows without bound, as a DynamicCache

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

    def _select_rows(self, indices: Tensor) -> None:
        """Keep, repeat or reorder batch rows: new row i is old row `indices[i]`."""
        indices = indices.to(self.evidence.device)
        old_rows = self.evidence.shape[0]
        self.evidence = self.evidence.index_select(0, indices)
        self.next_log_probs = self.next_log_probs.index_select(1, indices)
        self.last_real = self.last_real.index_select(0, indices)
        self.kept = self.kept.index_select(0, indices)
        self.routed = self.routed.index_select(0, indices)
        for j, cache in enumerate(self.expert_caches):
            # Where each old row sits in this expert's cache (-1: it routed the expert away).
            lookup = torch.full((old_rows,), -1, dtype=torch.long, device=indices.device)
            held = self.rows[j].to(indices.device)
            lookup[held] = torch.arange(held.numel(), device=indices.device)
            mapped = lookup[indices]
            self.rows[j] = (mapped >= 0).nonzero().flatten()
            if cache is not None:
                cache.batch_select_indices(mapped[mapped >= 0])

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.evidence.shape[0]
        self._select_rows(torch.arange(rows).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select_rows(indices)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._select_rows(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("an hdee ensemble cache cannot be cropped")

    def reset(self) -> None:
        raise NotImplementedError("an hdee ensemble cache cannot be reset; start a new one")


@dataclass
class HdeeEnsembleOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus what scoring and routing accounting read."""

    label_log_probs: Tensor | None = None  # [B, L] float64 (forward with label_ids)
    tokens_run: list[int] | None = None  # per expert: input tokens it ran on in this call


@dataclass
class _Chunk:
    """The state of one forward call: which tokens are evidence and where rows route."""

    input_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, past + L]
    position_ids: Tensor  # [B, L]
    counted: Tensor  # [B, L] bool: token t is evidence
    real: Tensor  # [B, L] bool
    kept: Tensor  # [B, E] bool
    routed: Tensor  # [B] bool (after routing at the chunk's start)
    route_at: Tensor  # [B]: index in the chunk where a row routes (L: not in this chunk)
    keep: int  # positions whose output is returned (the last `keep`)

    @property
    def deferred(self) -> Tensor:
        """[B] bool: rows that route inside this chunk (every expert runs them on it)."""
        return ~self.routed & (self.route_at < self.input_ids.shape[1])

    def rows_of(self, j: int) -> Tensor:
        """The rows expert j runs on: those that have not routed, or that kept it."""
        return (~self.routed | self.kept[:, j]).nonzero().flatten()


@dataclass
class _ExpertRun:
    """What one expert computed on its rows of a chunk."""

    j: int
    rows: Tensor  # the batch rows it ran on
    outputs: Tensor  # [r, keep, V] log-probs, or [r, keep] label log-probs
    evidence: Tensor  # [r, L] float64
    next_log_probs: Tensor  # [r, V]
    cache: Any


class _Mixer:
    """log sum_j w_j p_j accumulated expert by expert, per row. With a_j the unnormalised
    log-weight of expert j and Z = logsumexp_j a_j, the mixture is logsumexp_j (a_j - Z + lp_j),
    accumulated against the running Z so every term stays a log-weight <= 0 and float32 keeps it
    exact to ~1e-7 (a_j alone reaches thousands on long prefixes); float64 for labels."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.mixture = torch.full(shape, -torch.inf, dtype=dtype, device=device)
        self.normaliser = torch.full(shape[:2], -torch.inf, dtype=torch.float64, device=device)

    def add(self, rows: Tensor, outputs: Tensor, weight: Tensor) -> None:
        normaliser = self.normaliser[rows]
        total = torch.logaddexp(normaliser, weight)
        extra = (...,) + (None,) * (outputs.dim() - 2)
        dtype = self.mixture.dtype
        self.mixture[rows] = torch.logaddexp(
            self.mixture[rows] + _shifted(normaliser, total).to(dtype)[extra],
            outputs.to(dtype) + _shifted(weight, total).to(dtype)[extra],
        )
        self.normaliser[rows] = total


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
    def from_experts(
        cls, experts: list[LlamaForCausalLM], config: HdeeEnsembleConfig | None = None, **kwargs
    ) -> HdeeEnsembleForCausalLM:
        """An ensemble of already-loaded experts (used as they are, not copied). `config` (or
        `kwargs` for HdeeEnsembleConfig: posterior, prior, routing, ...) describes it; its
        expert entries default to the experts' own configs."""
        if config is None:
            entries = [
                {"name": str(j), "llama": expert.config.to_dict()}
                for j, expert in enumerate(experts)
            ]
            config = HdeeEnsembleConfig(experts=entries, **kwargs)
        if len(config.experts) != len(experts):
            raise ValueError(f"config lists {len(config.experts)} experts, got {len(experts)}")
        with torch.device("meta"):  # no memory for weights that are replaced right away
            ensemble = cls(config)
        ensemble.experts = nn.ModuleList(experts)
        eos = experts[0].config.eos_token_id
        ensemble.generation_config.eos_token_id = eos
        ensemble.generation_config.pad_token_id = eos
        return ensemble.to(experts[0].device)

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
        label_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> HdeeEnsembleOutput:
        """`logits` [B, L, V]: log of the ensemble's next-token distribution at every position
        (at the last `logits_to_keep` positions only, when it is > 0: generation needs one).
        With `label_ids` [B, L]: `label_log_probs` [B, L] of those tokens instead, no logits.

        `attention_mask` [B, past + L] marks real tokens (1) and padding (0); padding is never
        evidence for the posterior, and positions are counted over real tokens only.
        """
        cache = _own_cache(cache if cache is not None else past_key_values)
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        chunk = self._chunk(input_ids, attention_mask, position_ids, cache, logits_to_keep)
        length, device = input_ids.shape[1], input_ids.device
        keep = chunk.keep
        vocab = self.config.vocab_size
        shape = (
            (input_ids.shape[0], keep)
            if label_ids is not None
            else (input_ids.shape[0], keep, vocab)
        )
        dtype = torch.float64 if label_ids is not None else torch.float32
        mixer = _Mixer(shape, dtype, device)
        labels_kept = label_ids[:, -keep:] if label_ids is not None else None
        runs: list[_ExpertRun] = []
        deferred = bool(chunk.deferred.any())
        for j in range(len(self.experts)):
            rows = chunk.rows_of(j)
            if rows.numel() == 0:
                continue  # every row routed it away: it never runs again
            run = self._run_expert(j, rows, chunk, cache, labels_kept, use_cache)
            runs.append(run)
            if not deferred:
                mixer.add(rows, run.outputs, self._weight(run, chunk))
        if deferred:
            self._route_inside(chunk, runs)
            for run in runs:
                mixer.add(run.rows, run.outputs, self._weight(run, chunk))
        tokens_run = [0] * len(self.experts)
        for run in runs:
            tokens_run[run.j] = int(run.rows.numel()) * length
        new_cache = self._next_cache(chunk, cache, runs, tokens_run) if use_cache else None
        logits = None if label_ids is not None else mixer.mixture
        loss = None
        if labels is not None:
            if logits is None or keep != length:
                raise ValueError("labels need logits at every position (logits_to_keep=0)")
            loss = nn.functional.nll_loss(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(device),
                ignore_index=-100,
            )
        return HdeeEnsembleOutput(
            loss=loss,
            logits=logits,
            label_log_probs=mixer.mixture if label_ids is not None else None,
            tokens_run=tokens_run,
            **{OUTPUT_CACHE_FIELD: new_cache},
        )

    # ------------------------------------------------------------------------------------------
    # The pieces of a forward call

    def _chunk(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        cache: HdeeEnsembleCache | None,
        logits_to_keep: int,
    ) -> _Chunk:
        """Which tokens are evidence, the routing state before the chunk, and the rows that route
        on its first token (routed now, from the cache alone: their routed-away experts need not
        read that token at all, as `hdee generate` has always done)."""
        batch, length = input_ids.shape
        device = input_ids.device
        past = cache.seen if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=device)
        if position_ids is None:
            # Real tokens count positions from 0, whatever padding stands before them.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        position_ids = position_ids.to(device)
        real = attention_mask[:, -length:].bool()
        before = cache.last_real[:, None].to(device) if cache is not None else real[:, :1] & False
        counted = real & torch.cat([before, real[:, :-1]], dim=1)
        count = len(self.experts)
        routing = self.config.routing
        if cache is not None:
            kept, routed = cache.kept.to(device), cache.routed.to(device)
        elif routing["mode"] == "prior":
            kept = top_k_mask(self.log_prior.to(device), routing["top_k"]).expand(batch, -1)
            kept, routed = kept.clone(), torch.ones(batch, dtype=torch.bool, device=device)
        else:
            kept = torch.ones(batch, count, dtype=torch.bool, device=device)
            routed = torch.zeros(batch, dtype=torch.bool, device=device)
        route_at = torch.full((batch,), length, dtype=torch.long, device=device)
        if routing["mode"] in ("prefix", "budget"):
            at_n = real & (position_ids == routing["route_tokens"]) & ~routed[:, None]
            route_at = torch.where(at_n.any(dim=1), at_n.long().argmax(dim=1), route_at)
        route_at = torch.where(routed, torch.zeros_like(route_at), route_at)
        keep = length if not logits_to_keep else min(int(logits_to_keep), length)
        chunk = _Chunk(
            input_ids, attention_mask, position_ids, counted, real, kept, routed, route_at, keep
        )
        first = (~routed & (route_at == 0)).nonzero().flatten()
        if cache is not None and first.numel():
            token_lp = (
                cache.next_log_probs[:, first]
                .to(device)
                .gather(2, input_ids[None, first, :1].expand(count, -1, -1))[..., 0]
                .double()
                .T
            )  # [rows, E]: each expert's log-probability of the chunk's first token
            evidence = self._evidence_at(token_lp, counted[first, :1], cache.evidence[first])
            chunk.kept[first] = self._select(evidence)
            chunk.routed[first] = True
        return chunk

    def _select(self, evidence: Tensor) -> Tensor:
        """[rows, E] bool: the experts each row keeps, from its evidence at the routing token."""
        routing = self.config.routing
        log_weights = self.log_prior.to(evidence.device) + evidence
        if routing["mode"] == "budget":
            return budget_mask(log_weights, routing["flops"], routing["flop_budget"])
        return top_k_mask(log_weights, routing["top_k"])

    def _run_expert(
        self,
        j: int,
        rows: Tensor,
        chunk: _Chunk,
        cache: HdeeEnsembleCache | None,
        label_ids: Tensor | None,
        use_cache: bool,
    ) -> _ExpertRun:
        """Expert j on its rows of the chunk: its outputs at the kept positions (log-probs over
        the vocabulary, or of the labels), its evidence, and its new KV cache."""
        expert_cache = None
        if cache is not None:
            expert_cache = cache.expert_caches[j]
            held = cache.rows[j].to(rows.device)
            if expert_cache is not None and not torch.equal(held, rows):
                # Rows that routed it away leave its cache (rows only ever leave).
                position = torch.searchsorted(held, rows)
                expert_cache.batch_select_indices(position)
        input_ids = chunk.input_ids[rows]
        length, keep = input_ids.shape[1], chunk.keep
        arguments = {
            "input_ids": input_ids,
            "attention_mask": chunk.attention_mask[rows],
            "position_ids": chunk.position_ids[rows],
            "use_cache": use_cache,
            CACHE_ARGUMENT: expert_cache,
        }
        # Each token's log-probability under this expert (the evidence), read at the position
        # before it; in the chunk's last `keep` positions also the labels' (scoring).
        follow = torch.zeros_like(input_ids)
        follow[:, :-1] = input_ids[:, 1:]
        if label_ids is not None:
            # Scoring needs no distribution over the vocabulary: the head runs a few positions
            # at a time and only the wanted log-probabilities are kept.
            out = self.experts[j].model(**arguments)
            targets = torch.stack([follow, torch.zeros_like(follow)], dim=-1)
            targets[:, -keep:, 1] = label_ids[rows]
            picked, next_log_probs = _head_log_probs(
                self.experts[j].lm_head, out.last_hidden_state, targets
            )
            outputs = picked[:, -keep:, 1].double()
        else:
            out = self.experts[j](**arguments)
            logits = out.logits.float()  # [r, L, V]
            log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            picked = log_probs.gather(2, follow[..., None])
            outputs, next_log_probs = log_probs[:, -keep:], log_probs[:, -1]
        token_lp = torch.zeros(rows.numel(), length, dtype=torch.float64, device=input_ids.device)
        token_lp[:, 1:] = picked[:, :-1, 0].double()
        if cache is not None:
            previous = cache.next_log_probs[j, rows].to(input_ids.device)
            token_lp[:, 0] = previous.gather(1, input_ids[:, :1])[:, 0].double()
        before = cache.evidence[rows, j].to(input_ids.device) if cache is not None else None
        evidence = self._evidence(token_lp, chunk.counted[rows], before)
        return _ExpertRun(
            j, rows, outputs, evidence, next_log_probs, getattr(out, OUTPUT_CACHE_FIELD)
        )

    def _weight(self, run: _ExpertRun, chunk: _Chunk) -> Tensor:
        """[r, keep] float64: expert j's unnormalised log-weight at the kept positions (-inf
        where its row routed it away)."""
        keep = chunk.keep
        weight = self.log_prior[run.j].to(run.evidence.device) + run.evidence[:, -keep:]
        if self.config.routing["mode"] != "none":
            length = chunk.input_ids.shape[1]
            positions = torch.arange(length - keep, length, device=weight.device)
            after = positions[None, :] >= chunk.route_at[run.rows, None]
            weight = weight.masked_fill(
                after & ~chunk.kept[run.rows, run.j : run.j + 1], -torch.inf
            )
        return weight

    def _route_inside(self, chunk: _Chunk, runs: list[_ExpertRun]) -> None:
        """Route the rows whose routing token is inside this chunk (every expert ran them)."""
        here = chunk.deferred.nonzero().flatten()
        at = chunk.route_at[here].clamp(max=chunk.input_ids.shape[1] - 1)
        evidence = torch.zeros(here.numel(), len(self.experts), dtype=torch.float64)
        evidence = evidence.to(chunk.input_ids.device)
        for run in runs:
            # Every expert ran every row that has not routed: find those rows among its own.
            position = torch.searchsorted(run.rows, here)
            evidence[:, run.j] = run.evidence[position, at]
        chunk.kept[here] = self._select(evidence)
        chunk.routed[here] = True

    def _next_cache(
        self,
        chunk: _Chunk,
        cache: HdeeEnsembleCache | None,
        runs: list[_ExpertRun],
        tokens_run: list[int],
    ) -> HdeeEnsembleCache:
        batch, count = chunk.input_ids.shape[0], len(self.experts)
        device = chunk.input_ids.device
        if cache is None:
            vocab = self.config.vocab_size
            cache = HdeeEnsembleCache(
                expert_caches=[None] * count,
                evidence=torch.zeros(batch, count, dtype=torch.float64, device=device),
                next_log_probs=torch.zeros(count, batch, vocab, device=device),
                last_real=chunk.real[:, -1],
                kept=chunk.kept,
                routed=chunk.routed,
                rows=[torch.zeros(0, dtype=torch.long, device=device)] * count,
                tokens_run=torch.zeros(count, dtype=torch.long),
                seen=0,
            )
        for run in runs:
            cache.expert_caches[run.j] = run.cache
            cache.rows[run.j] = run.rows
            cache.evidence[run.rows, run.j] = run.evidence[:, -1]
            cache.next_log_probs[run.j, run.rows] = run.next_log_probs.to(
                cache.next_log_probs.dtype
            )
        cache.last_real = chunk.real[:, -1]
        cache.kept, cache.routed = chunk.kept, chunk.routed
        cache.tokens_run = cache.tokens_run + torch.tensor(tokens_run)
        cache.seen += chunk.input_ids.shape[1]
        return cache

    def _evidence(self, token_lp: Tensor, counted: Tensor, before: Tensor | None) -> Tensor:
        """One expert's evidence at each position, [B, L] float64: what its weight there uses
        (all counted tokens up to and including it), continuing `before` [B]."""
        if self.config.posterior == "prefix":
            start = before[:, None] if before is not None else 0.0
            return start + torch.cumsum(token_lp * counted, dim=1)
        # updating: the log-probability of the latest counted token, carried forward.
        positions = torch.arange(token_lp.shape[1], device=token_lp.device).expand_as(token_lp)
        latest = torch.where(counted, positions, -1).cummax(dim=1).values
        carried = token_lp.gather(1, latest.clamp(min=0))
        start = before[:, None] if before is not None else torch.zeros_like(token_lp[:, :1])
        return torch.where(latest >= 0, carried, start.expand_as(token_lp))

    def _evidence_at(self, token_lp: Tensor, counted: Tensor, before: Tensor) -> Tensor:
        """Every expert's evidence after one more token, [B, E]: `token_lp` [B, E] its
        log-probability under each expert, `counted` [B, 1], `before` [B, E]."""
        if self.config.posterior == "prefix":
            return before + token_lp * counted
        return torch.where(counted, token_lp, before)

    # ------------------------------------------------------------------------------------------
    # Reading the posterior

    def posterior_log_weights(
        self, cache: HdeeEnsembleCache, next_tokens: Tensor | None = None
    ) -> Tensor:
        """log P(j | everything read) [B, E] float64, renormalised over the experts each row
        still mixes; with `next_tokens` [B], also crediting those tokens (not yet read: the
        posterior after the last generated token, which no expert needs to run)."""
        evidence = cache.evidence
        if next_tokens is not None:
            index = next_tokens.to(cache.next_log_probs.device)[None, :, None]
            index = index.expand(len(self.experts), -1, -1)
            token_lp = cache.next_log_probs.gather(2, index)[..., 0].double().T  # [B, E]
            evidence = self._evidence_at(token_lp, cache.last_real[:, None], evidence)
        log_weights = self.log_prior.to(evidence.device) + evidence
        log_weights = log_weights.masked_fill(cache.routed[:, None] & ~cache.kept, -torch.inf)
        return log_weights - torch.logsumexp(log_weights, dim=1, keepdim=True)


def _head_log_probs(head: nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(log p(targets[b, t, i] | hidden[b, t]) `[B, L, I]`, the last position's log-distribution
    `[B, V]`) from the LM head, a chunk of positions at a time: at most ~4M logits exist at once
    on a CPU, ~256M on a GPU, never `B x L x V` (4 GB for 8 x 1024 tokens at 128K words)."""
    rows, length = hidden.shape[:2]
    vocab = head.out_features
    budget = 1 << (28 if hidden.device.type == "cuda" else 22)
    step = max(1, budget // max(1, rows * vocab))
    picked = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
    last = None
    for start in range(0, length, step):
        logits = head(hidden[:, start : start + step]).float()
        normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)
        picked[:, start : start + step] = (
            logits.gather(2, targets[:, start : start + step]) - normaliser
        )
        last = logits[:, -1] - normaliser[:, -1]
    assert last is not None
    return picked, last


def _own_cache(cache: Any) -> HdeeEnsembleCache | None:
    if cache is not None and not isinstance(cache, HdeeEnsembleCache):
        if cache.get_seq_length() != 0:
            raise ValueError(f"expected an HdeeEnsembleCache, got {type(cache).__name__}")
        return None  # an empty cache some caller made: start ours instead
    return cache


def ensemble_members(config: HdeeEnsembleConfig) -> list[str]:
    """The members' names, in the order of their weights in the prior."""
    return [str(expert["name"]) for expert in config.experts]


__all__ = [
    "HdeeEnsembleCache",
    "HdeeEnsembleConfig",
    "HdeeEnsembleForCausalLM",
    "HdeeEnsembleOutput",
    "ensemble_members",
]
