"""The training loss: next-token cross-entropy fused with the LM head, a chunk of positions at
a time.

The plain way (`F.cross_entropy(model(x).logits.float(), y)`) materialises the logits of every
position in fp32, then reads and writes them again for the log-softmax, its backward, the
zero-filled gradient of the label gather and the casts around them: at a 4096-token vocabulary
and 2048 positions that is 32 MB per pass, and on a CPU those passes cost more than the LM
head's matmul (a quarter of a hidden-128 step, half of a hidden-64 one); at a 128K vocabulary
they are gigabytes of GPU memory. `linear_cross_entropy` instead takes the final hidden states
and the LM-head weight and, for `chunk_tokens` positions at a time, computes the logits, the
loss, and (when a gradient is wanted) the gradient of the loss with respect to both inputs at
once: the chunk's logits stay in cache and are never stored for the backward pass, which only
scales the gradients kept. The numbers are those of the plain way: logits in the compute
precision (bf16 under autocast), softmax and loss in fp32, gradients matmuls in the compute
precision; the LM-head weight's gradient is summed over chunks in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LlamaForCausalLM

# Positions per chunk on a CPU when the config leaves it open: fp32 logits of about this many
# bytes per chunk (2 MB: 128 positions at a 4096 vocabulary), at least 16 positions: small
# enough to stay in cache between the passes over them, large enough for full-speed matmuls.
# Measured on a 2-core EPYC (hidden 64 and 128, vocabulary 4096): 128 positions per chunk
# were fastest of 32 to 2048, and 1.7x (hidden 64) and 1.2x (hidden 128) faster per step
# than the unfused loss.
AUTO_CHUNK_BYTES = 2 << 20
MIN_CHUNK_TOKENS = 16


def auto_chunk_tokens(vocab_size: int, device: torch.device) -> int:
    """Positions per loss chunk when `training.loss_chunk_tokens` is not set."""
    if device.type == "cuda":
        # On a GPU the passes are cheap and launches are not: chunks of 1 GB of fp32 logits
        # (8192 positions at a 32K vocabulary, 2048 at 128K) bound the memory without many.
        return max(MIN_CHUNK_TOKENS, (1 << 30) // (4 * vocab_size))
    return max(MIN_CHUNK_TOKENS, AUTO_CHUNK_BYTES // (4 * vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `labels`, with its gradient worked out
    during the forward pass (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        chunk_tokens: int,
        compute_dtype: torch.dtype,
    ) -> Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        count = labels.numel()
        hidden_c = hidden.to(compute_dtype)
        weight_c = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if want_weight
            else None
        )
        for start in range(0, count, chunk_tokens):
            stop = min(start + chunk_tokens, count)
            h, y = hidden_c[start:stop], labels[start:stop]
            log_probs = torch.log_softmax((h @ weight_c.t()).float(), dim=-1)
            rows = torch.arange(stop - start, device=hidden.device)
            total -= log_probs[rows, y].sum()
            if not (want_hidden or want_weight):
                continue
            # d(mean loss)/d(logits) = (softmax - one-hot) / count, made in place.
            grad_logits = log_probs.exp_()
            grad_logits[rows, y] -= 1.0
            grad_logits = grad_logits.mul_(1.0 / count).to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = grad_logits @ weight_c
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives a linear layer on `device_type` now (None: autocast is off)."""
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int
) -> Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` (positions x vocabulary) against
    `labels` (positions), `chunk_tokens` positions at a time, with the precision autocast gives
    a linear layer (the compute dtype) and fp32 for the softmax."""
    device_type = hidden.device.type
    compute_dtype = autocast_dtype(device_type) or weight.dtype
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, compute_dtype)


class CausalLMLoss(torch.nn.Module):
    """Mean next-token cross-entropy of a causal LM: the module DDP and torch.compile wrap.

    The LM head and the loss run fused, `chunk_tokens` positions at a time
    (`linear_cross_entropy`); None chooses the chunk from the vocabulary and device
    (`auto_chunk_tokens`).
    """

    def __init__(self, model: LlamaForCausalLM, chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, inputs: Tensor, labels: Tensor) -> Tensor:
        hidden = self.model.model(input_ids=inputs, use_cache=False).last_hidden_state
        weight = self.model.get_output_embeddings().weight
        chunk = self.chunk_tokens or auto_chunk_tokens(weight.shape[0], weight.device)
        return linear_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(), chunk)


def plain_causal_lm_loss(model: LlamaForCausalLM, inputs: Tensor, labels: Tensor) -> Tensor:
    """The unfused loss `CausalLMLoss` must equal (tests compare the two)."""
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
