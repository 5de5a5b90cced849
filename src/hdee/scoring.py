"""Running a model to score text: the device, the precision, loading an expert, label
log-probabilities. Shared by the training loop's validation, difficulty, evaluate and generate,
so all of them pick devices and precisions the same way.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from transformers import LlamaForCausalLM

from hdee.data.loaders import eval_batches
from hdee.model import load_model

Precision = Literal["auto", "fp32", "bf16"]


def resolve_device(setting: str = "auto") -> torch.device:
    """'auto' is CUDA when there is a GPU, else the CPU; anything else is taken as given."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_precision(setting: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on `device` (None: plain fp32). 'auto' is
    bf16 on a GPU that supports it, fp32 elsewhere. Weights stay fp32 either way."""
    if setting == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else None
    return torch.bfloat16 if setting == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision over fp32 weights (`dtype` None: a no-op)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Scoring and generation: bf16 autocast on CUDA (as in training), full precision on CPU."""
    return autocast(device, resolve_precision("auto", device))


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_expert(model_dir: Path, device: torch.device) -> LlamaForCausalLM:
    """A trained model from its HF directory, in eval mode (safetensors only: never unpickle)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no trained model here (has its job finished?)")
    return load_model(model_dir, device=device).eval()


@torch.inference_mode()
def label_log_probs(model: torch.nn.Module, batch: Tensor, chunk_size: int = 512) -> Tensor:
    """log p(label_t | inputs_<=t) of a causal LM, float32 `[B, T]`, for `batch` `[B, T + 1]`.

    Inputs are `batch[:, :-1]`, labels `batch[:, 1:]`. The base model runs once; the LM head,
    log-sum-exp and label gather then run on `chunk_size` token positions at a time, so at most
    `chunk_size x vocabulary` logits exist at once instead of `B x T x vocabulary` (which is
    4 GB for 32 x 1024 tokens with Llama-3's 128K vocabulary).
    """
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"batch must be [B, T + 1] with T >= 1, got shape {tuple(batch.shape)}")
    device = device_of(model)
    batch = batch.to(device)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    hidden = model.model(input_ids=inputs, use_cache=False).last_hidden_state  # [B, T, H]
    return head_label_log_probs(model, hidden, labels, chunk_size)


def head_label_log_probs(
    model: torch.nn.Module, hidden: Tensor, labels: Tensor, chunk_size: int = 512
) -> Tensor:
    """log p(label) from the base model's last hidden states `[B, T, H]`, float32 `[B, T]`:
    the LM head and log-sum-exp on `chunk_size` positions at a time (see `label_log_probs`;
    the routed scorer of `hdee.routing` calls it on the part of a window it ran)."""
    head = model.get_output_embeddings()
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    out = torch.empty(flat_labels.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, flat_labels.shape[0], chunk_size):
        stop = start + chunk_size
        # float32 for the normaliser: a bf16 log-sum-exp over 32K+ logits loses ~2 digits.
        logits = head(flat_hidden[start:stop]).float()
        label_logit = logits.gather(1, flat_labels[start:stop, None]).squeeze(1)
        out[start:stop] = label_logit - torch.logsumexp(logits, dim=1)
    return out.reshape(labels.shape)


def window_log_probs(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_windows: int | None,
) -> Tensor:
    """Label log-probs of a split's evaluation windows (`data.loaders.eval_batches`), float32
    `[num_windows, seq_len]` on the CPU, at inference precision."""
    rows = []
    with inference_autocast(device_of(model)):
        for batch in eval_batches(tokens, seq_len, batch_size, max_windows):
            rows.append(label_log_probs(model, batch).cpu())
    return torch.cat(rows)
