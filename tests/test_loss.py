"""The fused LM-head + cross-entropy loss (`hdee.loss`) against the plain, unfused loss."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hdee.loss import (
    AUTO_CHUNK_BYTES,
    MIN_CHUNK_TOKENS,
    CausalLMLoss,
    auto_chunk_tokens,
    linear_cross_entropy,
    plain_causal_lm_loss,
)
from train_helpers import random_llama


def _loss_and_grads(model: torch.nn.Module, loss_fn, inputs, labels, scale: float = 1.0):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(inputs, labels)
    (loss * scale).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [None, 1, 7, 48, 1000])  # auto, one, uneven, exact, one chunk
def test_fused_loss_equals_the_plain_loss_in_value_and_every_gradient(chunk: int | None) -> None:
    model = random_llama(64, seed=3, sharpen=4.0).train()
    batch = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    inputs, labels = batch[:, :-1], batch[:, 1:]
    plain_loss, plain_grads = _loss_and_grads(
        model, lambda i, y: plain_causal_lm_loss(model, i, y), inputs, labels
    )
    loss, grads = _loss_and_grads(model, CausalLMLoss(model, chunk), inputs, labels)
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_fused_loss_under_bf16_autocast_matches_the_plain_autocast_loss() -> None:
    """Logits in bf16 as autocast's linear gives them, softmax in fp32: the same loss, and
    gradients within bf16 rounding, of fp32 dtype for the fp32 master weights."""
    model = random_llama(64, seed=5, sharpen=4.0).train()
    batch = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(2))
    inputs, labels = batch[:, :-1], batch[:, 1:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_loss, plain_grads = _loss_and_grads(
            model, lambda i, y: plain_causal_lm_loss(model, i, y), inputs, labels
        )
        loss, grads = _loss_and_grads(model, CausalLMLoss(model, 10), inputs, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, plain_loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        scale = plain_grads[name].abs().max().item()
        torch.testing.assert_close(grad, plain_grads[name], atol=2e-2 * scale, rtol=0, msg=name)


def test_the_gradient_scales_with_the_upstream_gradient() -> None:
    """Gradient accumulation backpropagates loss / grad_accum: the kept gradients are scaled."""
    model = random_llama(64, seed=3).train()
    batch = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    fused = CausalLMLoss(model, 5)
    _, whole = _loss_and_grads(model, fused, batch[:, :-1], batch[:, 1:])
    _, quarter = _loss_and_grads(model, fused, batch[:, :-1], batch[:, 1:], scale=0.25)
    for name in whole:
        torch.testing.assert_close(quarter[name], whole[name] * 0.25, msg=name)


def test_tied_embeddings_get_both_gradients() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).train()
    batch = torch.randint(0, 32, (2, 11), generator=torch.Generator().manual_seed(4))
    inputs, labels = batch[:, :-1], batch[:, 1:]
    _, plain = _loss_and_grads(
        model, lambda i, y: plain_causal_lm_loss(model, i, y), inputs, labels
    )
    _, fused = _loss_and_grads(model, CausalLMLoss(model, 3), inputs, labels)
    embedding = "model.embed_tokens.weight"
    torch.testing.assert_close(fused[embedding], plain[embedding], atol=1e-6, rtol=1e-5)


def test_without_gradients_only_the_value_is_computed() -> None:
    hidden = torch.randn(10, 8)
    weight = torch.randn(20, 8)
    labels = torch.randint(0, 20, (10,))
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=3)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected)
    # Only the hidden states want a gradient (a frozen head): the head gets none.
    hidden.requires_grad_(True)
    linear_cross_entropy(hidden, weight, labels, chunk_tokens=4).backward()
    reference = hidden.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(reference @ weight.t(), labels).backward()
    torch.testing.assert_close(hidden.grad, reference.grad)
    assert weight.grad is None


def test_auto_chunks_hold_about_two_megabytes_of_logits_on_a_cpu() -> None:
    cpu = torch.device("cpu")
    assert auto_chunk_tokens(4096, cpu) == AUTO_CHUNK_BYTES // (4 * 4096) == 128
    assert auto_chunk_tokens(2048, cpu) == 256
    assert auto_chunk_tokens(128_256, cpu) == MIN_CHUNK_TOKENS  # never fewer positions
    assert auto_chunk_tokens(128_256, torch.device("cuda")) == (1 << 30) // (4 * 128_256)


def test_autocast_dtype_follows_the_autocast_context() -> None:
    from hdee.loss import autocast_dtype

    assert autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert autocast_dtype("cpu") is None
