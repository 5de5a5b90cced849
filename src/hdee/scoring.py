"""Running a model to score text: the device, the precision, loading an expert, label
log-probabilities. Shared by the training loop's validation, difficulty, evaluate and generate,
so all of them pick devices and precisions the same way.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from transformers import LlamaForCausalLM

from hdee.data.loaders import eval_batches
from hdee.integrity import verify_model_dir
from hdee.model import load_model

Precision = Literal["auto", "fp32", "bf16"]


def resolve_device(setting: str = "auto") -> torch.device:
    """'auto' is CUDA when there is a GPU, else the CPU; anything else is taken as given."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


# CPU flags (as /proc/cpuinfo spells them) of native bf16 matrix arithmetic: AVX-512 BF16's
# dot-product instructions and AMX tiles. Where they exist a bf16 matmul runs about twice as
# fast as fp32 (measured 2.2x on a 2-core EPYC with avx512_bf16); without them torch emulates
# bf16 and it is slower than fp32, so "has bf16 units" is the whole of the CPU decision.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of this machine (`cpuinfo`: the text of /proc/cpuinfo, read when
    None); empty where there is no /proc/cpuinfo (macOS, Windows): no bf16 claimed there."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":  # x86; every core lists the same flags, the first suffices
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 units (`CPU_BF16_FLAGS`), from its flags, never its vendor."""
    return bool(cpu_flags() & CPU_BF16_FLAGS)


def resolve_precision(setting: Precision, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype for a precision setting on `device` (None: plain fp32).

    'auto' is the fastest correct choice: bf16 on a GPU that supports it and on a CPU with
    bf16 units (`cpu_has_bf16`), fp32 elsewhere. Master weights and optimizer state stay fp32
    either way, and losses and log-softmaxes are computed in fp32 (`hdee.loss`,
    `label_log_probs`). On a bf16 CPU, bf16 is faster at every model size hdee's presets use
    (hidden 32 to 128: 1.1x to 1.3x per step, with eager attention and the fused loss), so
    the size of the model does not enter the choice."""
    if setting == "auto":
        if device.type == "cuda":
            bf16_ok = torch.cuda.is_bf16_supported()
        else:
            bf16_ok = device.type == "cpu" and cpu_has_bf16()
        return torch.bfloat16 if bf16_ok else None
    return torch.bfloat16 if setting == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision over fp32 weights (`dtype` None: a no-op)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def inference_precision(device: torch.device) -> torch.dtype | None:
    """Scoring and generation precision: bf16 autocast on CUDA (as in training), fp32 on every
    CPU, bf16 units or not. Cached label log-probs (`RUN/evaluation/logprobs/`) are keyed by
    job and tokens, not by machine, so CPU evaluation stays fp32 to give the same numbers on
    every CPU; on a bf16 CPU that costs speed, paid once per expert and split (cached)."""
    return resolve_precision("auto", device) if device.type == "cuda" else None


def validation_precision(
    device: torch.device, training_dtype: torch.dtype | None
) -> torch.dtype | None:
    """A training job's validation: its training precision on CUDA, fp32 on a CPU (as
    `inference_precision`), so a CPU job's validation loss is what `hdee evaluate` would
    compute from its weights on any CPU."""
    return training_dtype if device.type == "cuda" else None


def evaluation_dtype(precision: Literal["fp32", "bf16"]) -> torch.dtype | None:
    """The autocast dtype of `evaluation.precision` (None: plain fp32), on any device: unlike
    `inference_precision`, 'fp32' is fp32 on CUDA too, so a cached log-prob's recorded
    precision is the one it was computed in."""
    return torch.bfloat16 if precision == "bf16" else None


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The `inference_precision` context for scoring and generation."""
    return autocast(device, inference_precision(device))


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_expert(model_dir: Path, device: torch.device) -> LlamaForCausalLM:
    """A trained model from its HF directory, in eval mode (safetensors only: never unpickle).
    A finished job's `final/` must hold the weights its result.json records (IntegrityError
    naming the file otherwise)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no trained model here (has its job finished?)")
    verify_model_dir(model_dir)
    return load_model(model_dir, device=device).eval()


# Positions per LM-head chunk on a CPU: fp32 logits of about this many bytes (1 MB: 64
# positions at a 4096 vocabulary), at least 16 positions, so a chunk's logits stay in cache
# between the passes over them (matmul, max, sum of exponentials, normalise). Measured on a
# 2-core EPYC, hidden 64, vocabulary 4096, one thread: the head took 27-30 ms per 2048 positions
# at 32 to 128 positions per chunk against 60 ms at the 512 used before (docs/speed.md).
SCORING_CHUNK_BYTES = 1 << 20
MIN_SCORING_CHUNK = 16
# On a GPU passes are cheap and launches are not: 1 GB of fp32 logits per chunk (as hdee.loss).
GPU_SCORING_CHUNK_BYTES = 1 << 30


def scoring_chunk_positions(vocab_size: int, device: torch.device) -> int:
    """Token positions per LM-head chunk of `head_label_log_probs` when none is given."""
    budget = GPU_SCORING_CHUNK_BYTES if device.type == "cuda" else SCORING_CHUNK_BYTES
    return max(MIN_SCORING_CHUNK, budget // (4 * vocab_size))


@torch.inference_mode()
def label_log_probs(model: torch.nn.Module, batch: Tensor, chunk_size: int | None = None) -> Tensor:
    """log p(label_t | inputs_<=t) of a causal LM, float32 `[B, T]`, for `batch` `[B, T + 1]`.

    Inputs are `batch[:, :-1]`, labels `batch[:, 1:]`. The base model runs once; the LM head,
    log-softmax and label gather then run on `chunk_size` token positions at a time
    (`scoring_chunk_positions` when None), so at most `chunk_size x vocabulary` logits exist
    at once instead of `B x T x vocabulary` (which is 4 GB for 32 x 1024 tokens with
    Llama-3's 128K vocabulary).
    """
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"batch must be [B, T + 1] with T >= 1, got shape {tuple(batch.shape)}")
    device = device_of(model)
    batch = batch.to(device)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    hidden = model.model(input_ids=inputs, use_cache=False).last_hidden_state  # [B, T, H]
    return head_label_log_probs(model, hidden, labels, chunk_size)


def head_label_log_probs(
    model: torch.nn.Module, hidden: Tensor, labels: Tensor, chunk_size: int | None = None
) -> Tensor:
    """log p(label) from the base model's last hidden states `[B, T, H]`, float32 `[B, T]`:
    the LM head and the log-softmax on `chunk_size` positions at a time (see
    `label_log_probs`; the routed scorer of `hdee.routing` calls it on the part of a window it
    ran)."""
    head = model.get_output_embeddings()
    if chunk_size is None:
        chunk_size = scoring_chunk_positions(head.weight.shape[0], hidden.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    out = torch.empty(flat_labels.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, flat_labels.shape[0], chunk_size):
        stop = start + chunk_size
        # float32 for the normaliser: a bf16 log-sum-exp over 32K+ logits loses ~2 digits.
        # torch's fused log-softmax makes two passes over a cache-sized chunk where logsumexp
        # makes five (max, subtract, exp, sum, log) through fresh temporaries.
        log_probs = torch.log_softmax(head(flat_hidden[start:stop]).float(), dim=1)
        out[start:stop] = log_probs.gather(1, flat_labels[start:stop, None]).squeeze(1)
    return out.reshape(labels.shape)


# The `dtype` of `window_log_probs` that means "the inference precision of the device".
INFERENCE = "inference"


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to `count` for a while (process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def window_log_probs(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_windows: int | None,
    dtype: torch.dtype | None | Literal["inference"] = INFERENCE,
) -> Tensor:
    """Label log-probs of a split's evaluation windows (`data.loaders.eval_batches`), float32
    `[num_windows, seq_len]` on the CPU: under `dtype` autocast (None: plain fp32;
    "inference": `inference_precision`, as generation and difficulty score).

    On a CPU the batches are scored side by side, one per torch thread, each batch on one
    thread: the ops of a small model are too short for torch's threads to share them (two
    threads scored a demo expert 1.05x as fast as one, two batches side by side 1.4x; 2-core
    EPYC, docs/speed.md). Each batch's numbers are those of scoring it alone."""
    device = device_of(model)
    compute = inference_precision(device) if isinstance(dtype, str) else dtype

    def score(batch: Tensor) -> Tensor:
        with autocast(device, compute):  # autocast is per thread: entered in each worker
            return label_log_probs(model, batch).cpu()

    batches = eval_batches(tokens, seq_len, batch_size, max_windows)
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    if workers == 1:
        return torch.cat([score(batch) for batch in batches])
    with torch_threads(1), ThreadPoolExecutor(workers) as pool:
        return torch.cat(list(pool.map(score, batches)))
