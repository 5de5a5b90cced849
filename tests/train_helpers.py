"""Tiny token files and training specs shared by the model / train / DDP tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hdee.config import ModelConfig, TrainingConfig
from hdee.data.tokens import write_tokens
from hdee.model import llama_config
from hdee.records import Budget, Plan, PlannedConfiguration
from hdee.shapes import model_shapes
from hdee.train import TrainSpec

VOCAB = 64
SEQ_LEN = 16


def write_token_files(directory: Path) -> tuple[Path, Path]:
    """A learnable stream (a repeating pattern with a little noise) split into train and
    validation token files; returns their paths."""
    rng = np.random.default_rng(0)
    stream = np.tile(np.arange(24, dtype=np.uint16), 200)
    noise = rng.random(stream.size) < 0.05
    stream[noise] = rng.integers(0, VOCAB, int(noise.sum()), dtype=np.uint16)
    train, validation = directory / "train.bin", directory / "validation.bin"
    write_tokens(train, stream[:4000], {"vocab_size": VOCAB, "eos_token_id": 0})
    write_tokens(validation, stream[4000:], {"vocab_size": VOCAB, "eos_token_id": 0})
    return train, validation


def tiny_spec(tmp_path: Path, output: str = "job", size: str = "M", **training: Any) -> TrainSpec:
    train, validation = tmp_path / "train.bin", tmp_path / "validation.bin"
    if not train.exists():
        write_token_files(tmp_path)
    settings: dict[str, Any] = {
        "steps": 12,
        "batch_size": 4,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "eval_every": 6,
        "eval_batches": 2,
        "checkpoint_every": 4,
        "keep_checkpoints": 2,
    }
    settings.update(training)
    init_from = settings.pop("init_from", None)
    seed = settings.pop("seed", 1)
    config = llama_config(model_shapes(ModelConfig(preset="tiny"))[size], VOCAB, SEQ_LEN)
    return TrainSpec(
        kind="expert" if init_from else "seed",
        model=config.to_dict(),
        init_from=init_from,
        train_tokens=str(train),
        validation={"val": str(validation)},
        seq_len=SEQ_LEN,
        seed=seed,
        training=TrainingConfig(**settings),
        output_dir=str(tmp_path / output),
    )


def random_llama(
    vocab: int, seed: int = 0, layers: int = 2, kv_heads: int = 1, sharpen: float = 1.0
) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama in eval mode (hidden 16, FFN 32, 2 heads).
    `sharpen` scales the LM head: random weights give nearly flat distributions."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    if sharpen != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(sharpen)
    return model


def ensembles_plan(
    lanes: list[str],
    ensembles: dict[str, list[dict[str, str]]],
    trained: list[str],
    held_out: list[str] | None = None,
    classes: dict[str, str] | None = None,
) -> Plan:
    """A plan.json record holding only what evaluation and generation read: lanes, domains and
    each configuration's ensembles (job ids of experts saved by the test itself)."""
    configurations = {
        name: PlannedConfiguration(
            name=name,
            sizes={},
            steps={},
            budget=Budget(proxy=0.0, flops=0.0),
            ensembles=per_iteration,
        )
        for name, per_iteration in ensembles.items()
    }
    return Plan(
        lanes=lanes,
        classes=classes,
        schedule={lane: [] for lane in lanes},
        trained_domains=trained,
        held_out_domains=held_out or [],
        seeds={},
        jobs={},
        configurations=configurations,
        seed_budget=Budget(proxy=0.0, flops=0.0),
        baseline=next(iter(ensembles)),
        budget_measure="proxy",
    )


def live_ensemble(
    models: list[LlamaForCausalLM],
    posterior: str = "prefix",
    prior: list[float] | torch.Tensor | None = None,
    routing: dict[str, Any] | None = None,
) -> Any:
    """The live ensemble (`HdeeEnsembleForCausalLM`) of in-memory experts, as every inference
    command runs it."""
    from hdee.hf_ensemble import HdeeEnsembleForCausalLM

    weights = None if prior is None else [float(w) for w in torch.as_tensor(prior)]
    return HdeeEnsembleForCausalLM.from_experts(
        models, posterior=posterior, prior=weights, routing=routing
    ).eval()


def prefix_routing(k: int, route_tokens: int) -> dict[str, Any]:
    return {"mode": "prefix", "top_k": k, "route_tokens": route_tokens}
