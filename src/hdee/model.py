"""Llama model presets, parameter and FLOP counts, and safe (safetensors-only) load/save.

Every model hdee trains is a plain `transformers.LlamaForCausalLM`; checkpoints are ordinary
Hugging Face directories (`config.json` + `model.safetensors`), so any expert loads with
`LlamaForCausalLM.from_pretrained(dir)`. Sizes within a family differ only in the FFN width
(`intermediate_size`), as in the HDEE paper.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from hdee.atomic import atomic_directory
from hdee.config import ModelConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


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


def attention_implementation(
    device: str | torch.device = "cpu", compute_dtype: torch.dtype = torch.float32
) -> str:
    """FlashAttention-2 where it can run (installed, CUDA, bf16/fp16 compute), else SDPA."""
    on_cuda = torch.device(device).type == "cuda"
    half = compute_dtype in (torch.bfloat16, torch.float16)
    if on_cuda and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def llama_config(
    shape: ModelShape,
    vocab_size: int,
    seq_len: int,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    attn_implementation: str = "sdpa",
) -> LlamaConfig:
    """The `LlamaConfig` of one size. `vocab_size` must come from the tokenizer (never a
    constant: a mismatch silently trains an embedding table of the wrong size)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=seq_len,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        # Dropout 0 keeps training a pure function of (weights, data), so resume is exact.
        attention_dropout=0.0,
        rms_norm_eps=1e-5,
        use_cache=False,
        attn_implementation=attn_implementation,
    )


def _dims(cfg: LlamaConfig) -> tuple[int, int, int, int, int, int]:
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


def parameter_counts(cfg: LlamaConfig) -> tuple[int, int]:
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


def matmul_parameters(cfg: LlamaConfig) -> int:
    """Parameters that take part in a matmul per token: everything except the input embedding
    table (a lookup, no FLOPs); the LM head counts even when tied to the embedding."""
    vocab, hidden = cfg.vocab_size, cfg.hidden_size
    return parameter_counts(cfg)[1] + vocab * hidden


def training_flops_per_token(cfg: LlamaConfig, seq_len: int) -> int:
    """Training FLOPs per token, PaLM-style (Chowdhery et al. 2022, appendix B):

        6 * N + 12 * layers * hidden * seq_len

    N = `matmul_parameters(cfg)`: 2 FLOPs per multiply-add forward, 4 backward, so 6 per
    parameter. The second term is the attention scores and weighted sum (QK^T and AV, which have
    no parameters): 2 matmuls x 2 FLOPs x seq_len x hidden per layer forward, times 3 for
    forward + backward. Norms, softmax and activations are ignored (a few percent at most).
    """
    return 6 * matmul_parameters(cfg) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


# ----------------------------------------------------------------------------------------------
# Save / load


def save_model(model: LlamaForCausalLM, directory: str | Path) -> Path:
    """Write `model` as an HF directory (config.json + model.safetensors) atomically: into a
    temporary directory first, renamed into place only when complete."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_model_files(model, tmp)
    return directory


def write_model_files(model: LlamaForCausalLM, directory: str | Path) -> None:
    """The HF files of `model` into an existing (temporary) directory; not atomic by itself."""
    # Unwrap DDP / torch.compile so parameter names are the plain HF ones.
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    with _quiet_hf():
        model.save_pretrained(directory)
    if not (Path(directory) / WEIGHTS_NAME).is_file():
        # Big models are sharded by save_pretrained; hdee's small models never should be.
        raise RuntimeError(f"{directory}: save_pretrained did not write {WEIGHTS_NAME}")


def check_model_dir(directory: str | Path) -> None:
    """Raise ValueError naming the file when an HF model directory is missing or corrupt."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: model directory does not exist")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{config_path}: model config is missing")
    try:
        json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: corrupt model config ({error})") from None
    check_safetensors(directory / WEIGHTS_NAME)


def check_safetensors(path: str | Path) -> None:
    """Raise ValueError naming `path` when it is missing, truncated or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file is missing")
    try:
        # safe_open validates the header and that the data section covers every tensor, so a
        # truncated file fails here instead of deep inside from_pretrained.
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({error})") from None
    if not names:
        raise ValueError(f"{path}: safetensors file holds no tensors")


@contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence transformers' per-file progress bars (noise inside a training log)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> LlamaForCausalLM:
    """Load an HF model directory written by `save_model` (safetensors only, never pickles).

    A missing, truncated or corrupt file raises ValueError naming that file; so do weights that
    do not fit the config (from_pretrained would otherwise re-initialise them with a warning).
    """
    directory = Path(directory)
    check_model_dir(directory)
    try:
        with _quiet_hf():
            model, info = LlamaForCausalLM.from_pretrained(
                directory,
                use_safetensors=True,
                dtype=dtype,
                attn_implementation=attn_implementation or attention_implementation(device, dtype),
                output_loading_info=True,
            )
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"{directory / WEIGHTS_NAME}: cannot load model ({error})") from None
    problems = {k: v for k, v in info.items() if v and k != "unexpected_keys"}
    if problems:
        raise ValueError(f"{directory / WEIGHTS_NAME}: weights do not match config: {problems}")
    return model.to(device)
