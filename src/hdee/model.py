"""Llama models: the `LlamaConfig` of a size, and safe (safetensors-only) load/save.

The sizes themselves and their parameter and FLOP counts are pure arithmetic, in shapes.py.

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
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from hdee.atomic import atomic_directory
from hdee.integrity import WEIGHTS_FILE
from hdee.shapes import Architecture, ModelShape

WEIGHTS_NAME = WEIGHTS_FILE
CONFIG_NAME = "config.json"


# Up to this sequence length, bf16 attention on a CPU is faster written out (eager: two batched
# matmuls and a softmax) than through torch's fused CPU kernel (SDPA): a hidden-128 training
# step took 0.75x the time at 256 tokens and 0.88x at 512, but 2x as long at 1024
# (2-core EPYC with avx512_bf16, torch 2.13; docs/speed.md). In fp32 SDPA is as fast or faster.
CPU_BF16_EAGER_MAX_SEQ_LEN = 512


def attention_implementation(
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    seq_len: int | None = None,
) -> str:
    """FlashAttention-2 where it can run (installed, CUDA, bf16/fp16 compute); eager for bf16
    on a CPU with sequences of at most `CPU_BF16_EAGER_MAX_SEQ_LEN`; else SDPA."""
    device_type = torch.device(device).type
    half = compute_dtype in (torch.bfloat16, torch.float16)
    if device_type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    short = seq_len is not None and seq_len <= CPU_BF16_EAGER_MAX_SEQ_LEN
    if device_type == "cpu" and compute_dtype == torch.bfloat16 and short:
        return "eager"
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
        **asdict(Architecture.of(shape, vocab_size)),
        max_position_embeddings=seq_len,
        rope_theta=shape.rope_theta,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        # Dropout 0 keeps training a pure function of (weights, data), so resume is exact.
        attention_dropout=0.0,
        rms_norm_eps=1e-5,
        use_cache=False,
        attn_implementation=attn_implementation,
    )


@contextmanager
def attention_set_to(model: LlamaForCausalLM, implementation: str) -> Iterator[None]:
    """Run `model` with another attention implementation for a while (e.g. a CPU job trained
    with eager bf16 attention validates in fp32 with SDPA, as `hdee evaluate` scores)."""
    before = model.config._attn_implementation
    if before == implementation:
        yield
        return
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


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
