"""Model sizes and their arithmetic: presets, parameter counts, training FLOPs.

Pure arithmetic, no torch: the planner budgets jobs with it before anything is built, and
`hdee plan` starts in a fraction of a second. The counts take a `LlamaConfig` or an
`Architecture` (the same numbers without transformers); tests check them against real models.
Sizes within a family differ only in the FFN width (`intermediate_size`), as in the HDEE paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hdee.config import ModelConfig

if TYPE_CHECKING:  # only for annotations: importing transformers takes seconds
    from transformers import LlamaConfig


@dataclass(frozen=True)
class ModelShape:
    """One model size: everything about the architecture except the vocabulary and context."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0
    tie_embeddings: bool = False


# Family -> shared dimensions and FFN width per size. `tiny` keeps the paper's 0.75 / 1 / 1.25
# FFN ratio so budget arithmetic on a laptop behaves like the real family.
PRESETS: dict[str, dict[str, Any]] = {
    "small-close": {
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "ffn_sizes": {"S": 2304, "M": 3072, "L": 3840},
    },
    "tiny": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "ffn_sizes": {"S": 96, "M": 128, "L": 160},
    },
}


def model_shapes(model_cfg: ModelConfig) -> dict[str, ModelShape]:
    """Size name -> shape: the preset, with every explicit field of `model_cfg` overriding it.

    Explicit `ffn_sizes` replace the preset's sizes as a whole (not merged), so a config that
    names only {M: ...} gets exactly one size.
    """
    base: dict[str, Any] = dict(PRESETS.get(model_cfg.preset, {}))
    for key in ("hidden_size", "num_layers", "num_heads", "ffn_sizes"):
        value = getattr(model_cfg, key)
        if value is not None:
            base[key] = value
    missing = [k for k in ("hidden_size", "num_layers", "num_heads", "ffn_sizes") if k not in base]
    if missing:
        raise ValueError(f"model: preset {model_cfg.preset!r} needs explicit {', '.join(missing)}")
    hidden, heads = int(base["hidden_size"]), int(base["num_heads"])
    kv_heads = int(model_cfg.num_kv_heads or heads)
    if hidden % heads:
        raise ValueError(f"model: hidden_size {hidden} is not divisible by num_heads {heads}")
    if heads % kv_heads:
        raise ValueError(f"model: num_heads {heads} is not divisible by num_kv_heads {kv_heads}")
    if not base["ffn_sizes"]:
        raise ValueError("model: ffn_sizes is empty")
    return {
        name: ModelShape(
            name=name,
            hidden_size=hidden,
            num_layers=int(base["num_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            intermediate_size=int(ffn),
            rope_theta=model_cfg.rope_theta,
            tie_embeddings=model_cfg.tie_embeddings,
        )
        for name, ffn in base["ffn_sizes"].items()
    }


@dataclass(frozen=True)
class Architecture:
    """The dimensions `llama_config(shape, vocab_size, ...)` gives, without building one."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None
    intermediate_size: int
    tie_word_embeddings: bool = False

    @classmethod
    def of(cls, shape: ModelShape, vocab_size: int) -> Architecture:
        return cls(
            vocab_size=vocab_size,
            hidden_size=shape.hidden_size,
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_kv_heads,
            intermediate_size=shape.intermediate_size,
            tie_word_embeddings=shape.tie_embeddings,
        )


def _dims(cfg: Architecture | LlamaConfig) -> tuple[int, int, int, int, int, int]:
    hidden = cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    return (
        cfg.vocab_size,
        hidden,
        cfg.num_hidden_layers,
        cfg.num_attention_heads * head_dim,
        kv_heads * head_dim,
        cfg.intermediate_size,
    )


def parameter_counts(cfg: Architecture | LlamaConfig) -> tuple[int, int]:
    """(total, non_embedding) parameters of `LlamaForCausalLM(cfg)`, computed arithmetically.

    non_embedding = total minus the token-embedding table and minus an untied LM head, i.e. the
    transformer blocks and the final norm (the usual scaling-law convention).
    """
    vocab, hidden, layers, q_dim, kv_dim, ffn = _dims(cfg)
    attn_bias = bool(getattr(cfg, "attention_bias", False))
    mlp_bias = bool(getattr(cfg, "mlp_bias", False))
    attention = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden
    if attn_bias:
        attention += q_dim + 2 * kv_dim + hidden
    mlp = 3 * hidden * ffn + ((2 * ffn + hidden) if mlp_bias else 0)
    per_layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    non_embedding = layers * per_layer + hidden  # + final RMSNorm
    embeddings = vocab * hidden * (1 if cfg.tie_word_embeddings else 2)
    return non_embedding + embeddings, non_embedding


def matmul_parameters(cfg: Architecture | LlamaConfig) -> int:
    """Parameters that take part in a matmul per token: everything except the input embedding
    table (a lookup, no FLOPs); the LM head counts even when tied to the embedding."""
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    return parameter_counts(cfg)[1] + vocab * hidden


def training_flops_per_token(cfg: Architecture | LlamaConfig, seq_len: int) -> int:
    """Training FLOPs per token, PaLM-style (Chowdhery et al. 2022, appendix B):

        6 * N + 12 * layers * hidden * seq_len

    N = `matmul_parameters(cfg)`: 2 FLOPs per multiply-add forward, 4 backward, so 6 per
    parameter. The second term is the attention scores and weighted sum (QK^T and AV, which have
    no parameters): 2 matmuls x 2 FLOPs x seq_len x hidden per layer forward, times 3 for
    forward + backward. Norms, softmax and activations are ignored (a few percent at most).
    """
    return 6 * matmul_parameters(cfg) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def forward_flops_per_token(cfg: Architecture | LlamaConfig, seq_len: int) -> int:
    """Inference (forward-only) FLOPs per token, the forward third of `training_flops_per_token`:

        2 * N + 4 * layers * hidden * seq_len

    N = `matmul_parameters(cfg)` (2 x non-embedding parameters + 2 x hidden x vocabulary for the
    LM head, in FLOPs); the second term is QK^T and AV over a context of `seq_len` (the same
    convention as training: an upper bound, a causal token attends to its prefix only). Routed
    ensembles (`hdee.routing`) count their cost per scored token with it.
    """
    return 2 * matmul_parameters(cfg) + 4 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def cluster_router_flops(terms: int, dims: int, clusters: int) -> int:
    """FLOPs of the cluster prior of one sequence (hdee.clusters.ClusterRouter), counted as a
    forward pass is (a multiply and an add: 2 FLOPs):

        tf-idf of `terms` distinct terms: 1 + ln(count), times idf, L2 norm   ~ 6 * terms
        projection on the SVD components [dims, V], sparse                      2 * terms * dims
        L2 norm of the projection                                               3 * dims
        squared distances to `clusters` centroids                               3 * clusters * dims
        softmax with a temperature (and top k)                                  5 * clusters

    The text's tokenisation into terms is string work, not arithmetic, and like the experts'
    tokenizer it is not counted."""
    if min(terms, dims, clusters) < 0:
        raise ValueError(f"terms, dims and clusters must be >= 0, got {terms}, {dims}, {clusters}")
    return 6 * terms + 2 * terms * dims + 3 * dims + 3 * clusters * dims + 5 * clusters
