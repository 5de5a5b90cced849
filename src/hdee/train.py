"""One training job: a seed (from scratch) or an expert (branched from a checkpoint).

The loop is nanoGPT-style and reads top to bottom in `run_training`. A job is described
completely by a `TrainSpec` and lives in its own directory (see docs/architecture.md):

    spec.json, checkpoints/step_XXXXXXX/, final/, metrics.jsonl, tensorboard/, result.json

Guarantees:
- Resumable: every batch is a pure function of (seed, step, rank) and the learning rate a pure
  function of step, so continuing from a checkpoint reproduces the uninterrupted run (on CPU
  bit for bit).
- No pickles: weights and optimizer tensors are safetensors, everything else JSON.
- Atomic: checkpoints and `final/` are written into a temporary directory and renamed;
  `result.json` is written last, so a job is finished exactly when it exists.
- The same entry point runs single-process or under `torchrun` (DDP; only rank 0 writes).

    python -m hdee.train SPEC.json
    torchrun --nproc-per-node 4 -m hdee.train SPEC.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, model_validator
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hdee.atomic import atomic_directory, read_json, write_json, write_text
from hdee.config import TrainingConfig
from hdee.data.loaders import eval_batches, train_batch
from hdee.data.tokens import load_tokens, read_manifest
from hdee.model import (
    attention_implementation,
    check_safetensors,
    load_model,
    save_model,
    write_model_files,
)
from hdee.shapes import parameter_counts, training_flops_per_token

LOG_EVERY = 10  # optimizer steps between training-loss log lines (plus the first and last)
TRAINER_STATE_JSON = "trainer_state.json"
TRAINER_STATE_TENSORS = "trainer_state.safetensors"
CHECKPOINT_PREFIX = "step_"


class TrainSpec(BaseModel):
    """Everything that determines one training job's result."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["seed", "expert"]
    model: dict[str, Any]  # LlamaConfig.to_dict()
    init_from: str | None = None  # HF model directory to branch from (experts)
    train_tokens: str
    validation: dict[str, str] = {}
    seq_len: int
    seed: int = 0
    training: TrainingConfig = TrainingConfig()
    output_dir: str

    @model_validator(mode="after")
    def _expert_has_parent(self) -> TrainSpec:
        if self.kind == "expert" and not self.init_from:
            raise ValueError("an expert job needs init_from (the checkpoint it branches from)")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        return self

    def identity(self) -> dict[str, Any]:
        """The spec without where it lives: a moved job directory still resumes."""
        data = self.model_dump(mode="json")
        data.pop("output_dir")
        return data


class CausalLMLoss(torch.nn.Module):
    """Mean next-token cross-entropy of a causal LM: the module DDP and torch.compile wrap.

    With `chunk_tokens`, the LM head and the loss run on that many positions at a time, each
    chunk under activation checkpointing: its logits are recomputed in the backward pass
    instead of kept. A 128K vocabulary holds 0.5 MB of fp32 logits per position, so a
    14 x 1024 micro-batch saves about 7 GB for one extra LM-head forward.
    """

    def __init__(self, model: LlamaForCausalLM, chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.chunk_tokens:
            logits = self.model(input_ids=inputs, use_cache=False).logits
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        from torch.utils.checkpoint import checkpoint

        hidden = self.model.model(input_ids=inputs, use_cache=False).last_hidden_state
        hidden, flat_labels = hidden.flatten(0, 1), labels.flatten()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, flat_labels.numel(), self.chunk_tokens):
            stop = start + self.chunk_tokens
            total = total + checkpoint(
                self._chunk_loss, hidden[start:stop], flat_labels[start:stop], use_reentrant=False
            )
        return total / flat_labels.numel()

    def _chunk_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden).float()
        return F.cross_entropy(logits, labels, reduction="sum")


def lr_at(step: int, training: TrainingConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr` over
    `warmup_steps`, then cosine decay that reaches `min_lr` exactly at the last step
    (`steps - 1`). Each job runs its own schedule to its own length."""
    steps, warmup = training.steps, min(training.warmup_steps, training.steps)
    if step < warmup:
        return training.lr * (step + 1) / warmup
    decay_steps = steps - 1 - warmup
    if decay_steps <= 0:
        return training.lr if warmup > 0 else training.min_lr
    progress = min(1.0, (step - warmup) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return training.min_lr + cosine * (training.lr - training.min_lr)


# ----------------------------------------------------------------------------------------------
# Process setup: device, precision, DDP


@dataclass(frozen=True)
class _Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain fp32
    owns_group: bool  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def _setup_runtime(training: TrainingConfig) -> _Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if training.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(training.device)
    if device.type == "cuda":
        # One GPU per process under torchrun; an explicit index applies to single-process runs.
        index = local_rank if world_size > 1 or device.index is None else device.index
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    precision = training.precision
    if precision == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16_ok else "fp32"
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    return _Runtime(rank, local_rank, world_size, device, amp_dtype, owns_group)


def _all_reduce_sum(values: list[float], runtime: _Runtime) -> list[float]:
    if not runtime.ddp:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------------------------
# Checkpoints: HF model files + optimizer tensors (safetensors) + the rest (JSON)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into named tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, _, index, key = name.split(".", 3)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, Any]:
    # Training itself uses no randomness (dropout 0, data from the step); saved so anything
    # stochastic added later resumes exactly too.
    state: dict[str, Any] = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and "cuda" in state:
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _checkpoint_dirs(root: Path) -> list[Path]:
    """Complete step checkpoints, oldest first (temporary `.step_*` dirs are not listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> Path:
    """Write one checkpoint atomically: HF model files plus trainer state."""
    with atomic_directory(directory) as tmp:
        write_model_files(model, tmp)  # type: ignore[arg-type]
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / TRAINER_STATE_TENSORS))
        write_json(tmp / TRAINER_STATE_JSON, {**state, "optimizer": meta})
    return directory


def load_checkpoint(
    directory: Path, runtime: _Runtime, attn_implementation: str
) -> tuple[LlamaForCausalLM, dict[str, Any], dict[str, Any]]:
    """(model, trainer state JSON, optimizer state dict) of a checkpoint; ValueError naming
    the file when any part is missing or corrupt."""
    state_path = directory / TRAINER_STATE_JSON
    if not state_path.is_file():
        raise ValueError(f"{state_path}: trainer state is missing")
    state = read_json(state_path)
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise ValueError(f"{state_path}: not a trainer state (no 'step' / 'optimizer')")
    tensor_path = directory / TRAINER_STATE_TENSORS
    check_safetensors(tensor_path)
    try:
        tensors = load_file(str(tensor_path))
    except Exception as error:  # safetensors has its own error types
        raise ValueError(f"{tensor_path}: corrupt trainer state ({error})") from None
    model = load_model(directory, runtime.device, torch.float32, attn_implementation)
    return model, state, _unflatten_optimizer(tensors, state["optimizer"])


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: Any,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    runtime: _Runtime | None = None,
) -> dict[str, float]:
    """Mean loss and perplexity on the first `max_batches` fixed validation batches; ranks
    split the batches and sum (loss, count), so every rank gets the same numbers. Without a
    runtime: one process, fp32, on the model's device."""
    if runtime is None:
        device = next(model.parameters()).device
        runtime = _Runtime(0, 0, 1, device, None, owns_group=False)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    batches = eval_batches(tokens, seq_len, batch_size, max_windows=max_batches * batch_size)
    for index, batch in enumerate(batches):
        if index % runtime.world_size != runtime.rank:
            continue
        batch = batch.to(runtime.device)
        with runtime.autocast():
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
        )
        total += float(loss)
        count += batch[:, 1:].numel()
    total, count = _all_reduce_sum([total, count], runtime)
    model.train(was_training)
    mean = total / max(count, 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0))}


# ----------------------------------------------------------------------------------------------
# Small helpers


def _build_optimizer(
    model: torch.nn.Module, training: TrainingConfig, device: torch.device
) -> torch.optim.AdamW:
    # Weight decay on matrices (linear weights, embeddings) only, never on norm gains.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    betas = (training.beta1, training.beta2)
    # The fused kernel (one launch for all parameters) exists for CUDA and, in recent torch,
    # CPU; fall back to foreach where it does not.
    try:
        return torch.optim.AdamW(groups, lr=training.lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=training.lr, betas=betas, foreach=True)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop log lines after `step` (written after the checkpoint we resume from) and any
    half-written last line, so the resumed log reads like an uninterrupted one."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line)
    write_text(path, "".join(f"{line}\n" for line in kept))


def _cleanup_temporaries(output: Path) -> None:
    """Remove temporary directories a killed writer left behind (`.name.XXXX.tmp`)."""
    for parent in (output, output / "checkpoints"):
        if parent.is_dir():
            for path in parent.glob(".*.tmp"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


def _check_spec(output: Path, spec: TrainSpec) -> None:
    path = output / "spec.json"
    if path.exists():
        stored = read_json(path)
        stored.pop("output_dir", None)
        if stored != spec.identity():
            raise ValueError(
                f"{path}: this job directory holds a different job; use a new output_dir "
                "(or delete the directory to start over)"
            )


def _progress_bar(enabled: bool, total: int, start: int, description: str) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )
    bar.add_task(description, total=total, completed=start, loss="-", tps="-")
    return bar


# ----------------------------------------------------------------------------------------------
# The job


def run_training(
    spec: TrainSpec, progress: bool = True, *, stop_after: int | None = None
) -> dict[str, Any]:
    """Run (or resume, or skip) one training job and return its result (result.json).

    `stop_after`: stop once this global step is reached, writing nothing more, as if the process
    had been killed there (tests and time-slicing schedulers use it); returns
    {"finished": False, "step": ...}.
    """
    output = Path(spec.output_dir)
    result_path = output / "result.json"
    if result_path.exists():
        return read_json(result_path)
    runtime = _setup_runtime(spec.training)
    try:
        return _train(spec, runtime, progress, stop_after)
    finally:
        if runtime.owns_group:
            dist.destroy_process_group()


def _train(
    spec: TrainSpec, runtime: _Runtime, progress: bool, stop_after: int | None
) -> dict[str, Any]:
    tc = spec.training
    output = Path(spec.output_dir)
    checkpoints = output / "checkpoints"
    started = time.perf_counter()
    _check_spec(output, spec)
    if runtime.is_main:
        output.mkdir(parents=True, exist_ok=True)
        _cleanup_temporaries(output)
        if not (output / "spec.json").exists():
            write_json(output / "spec.json", spec.model_dump(mode="json"))

    # ---- data
    train_tokens = load_tokens(spec.train_tokens)
    validation = {name: load_tokens(path) for name, path in spec.validation.items()}
    config = LlamaConfig.from_dict(dict(spec.model))
    if spec.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"seq_len {spec.seq_len} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    for path in [spec.train_tokens, *spec.validation.values()]:
        data_vocab = read_manifest(path).get("vocab_size")
        if data_vocab is not None and int(data_vocab) > config.vocab_size:
            raise ValueError(
                f"{path}: tokens from a vocabulary of {data_vocab}, model has {config.vocab_size}"
            )

    # ---- model and optimizer: resume from the newest readable checkpoint, else initialise
    attn = attention_implementation(runtime.device, runtime.amp_dtype or torch.float32)
    start_step, state, optimizer_state = 0, {}, None
    model: LlamaForCausalLM | None = None
    for directory in reversed(_checkpoint_dirs(checkpoints)):
        try:
            model, state, optimizer_state = load_checkpoint(directory, runtime, attn)
            start_step = int(state["step"])
            break
        except ValueError as error:
            warnings.warn(f"skipping unreadable checkpoint: {error}", stacklevel=2)
    if model is None:
        if spec.init_from:
            # The "branch" of Branch-Train-Merge: start from the parent's weights.
            model = load_model(spec.init_from, runtime.device, torch.float32, attn)
            _check_same_architecture(spec.init_from, model.config, config)
        else:
            config._attn_implementation = attn
            # Seeded init on the CPU generator (same weights on any device and every rank),
            # without disturbing the caller's RNG.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                model = LlamaForCausalLM(config)
            model = model.to(runtime.device)
    else:
        _set_rng_state(state.get("rng", {"torch": torch.get_rng_state().tolist()}))
    model.train()
    raw_model = model
    optimizer = _build_optimizer(raw_model, tc, runtime.device)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # What DDP and compile wrap: the model and its loss, so a chunked loss syncs like any.
    model = CausalLMLoss(raw_model, tc.loss_chunk_tokens)  # type: ignore[assignment]
    if tc.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    if runtime.ddp:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)  # type: ignore[assignment]

    # ---- derived numbers
    vocab = raw_model.config.vocab_size
    total_params, non_embedding = parameter_counts(raw_model.config)
    tokens_per_step = tc.batch_size * spec.seq_len * tc.grad_accum * runtime.world_size
    flops_per_token = training_flops_per_token(raw_model.config, spec.seq_len)
    if runtime.is_main:
        precision = "bf16 autocast" if runtime.amp_dtype else "fp32"
        print(
            f"[hdee.train] {spec.kind} job -> {output}\n"
            f"  parameters {total_params:,} ({non_embedding:,} non-embedding), vocab {vocab:,}\n"
            f"  tokens/step {tokens_per_step:,} = batch {tc.batch_size} x seq {spec.seq_len} x "
            f"accum {tc.grad_accum} x ranks {runtime.world_size}; {tc.steps:,} steps = "
            f"{tokens_per_step * tc.steps:,} tokens\n"
            f"  training FLOPs/token {flops_per_token:.3e}, total "
            f"{flops_per_token * tokens_per_step * tc.steps:.3e}\n"
            f"  device {runtime.device}, {precision}, attention {attn}"
            + (f"; resuming at step {start_step}" if start_step else ""),
            flush=True,
        )

    # ---- logging (rank 0 only)
    metrics_path = output / "metrics.jsonl"
    writer = None
    metrics_file = None
    if runtime.is_main:
        from torch.utils.tensorboard import SummaryWriter

        _trim_metrics(metrics_path, start_step)
        metrics_file = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        # purge_step drops TensorBoard events after the checkpoint we resume from.
        writer = SummaryWriter(str(output / "tensorboard"), purge_step=start_step + 1)

    def log(row: dict[str, Any]) -> None:
        if metrics_file is None or writer is None:
            return
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, row["step"])

    def run_eval(step: int) -> dict[str, dict[str, float]]:
        results = {
            name: evaluate(raw_model, tokens, spec.seq_len, tc.batch_size, tc.eval_batches, runtime)
            for name, tokens in validation.items()
        }
        row: dict[str, Any] = {"step": step, "tokens": step * tokens_per_step}
        for name, values in results.items():
            row[f"val/{name}/loss"] = values["loss"]
            row[f"val/{name}/ppl"] = values["perplexity"]
        if results:
            log(row)
        return results

    # ---- the loop
    show_bar = progress and runtime.is_main and sys.stdout.isatty()
    # Without a terminal (a runner's log file) print a plain line about 20 times per job.
    plain_every = max(1, tc.steps // 20 // LOG_EVERY) * LOG_EVERY
    plain_lines = progress and runtime.is_main and not show_bar
    bar = _progress_bar(show_bar, tc.steps, start_step, f"{spec.kind} {output.name}")
    last_loss = state.get("last_loss")
    seconds = float(state.get("seconds", 0.0))
    last_eval: tuple[int, dict[str, dict[str, float]]] | None = None
    window_start, window_tokens = time.perf_counter(), 0
    step = start_step
    with bar:
        for step in range(start_step, tc.steps):
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=runtime.device)
            for micro_step in range(tc.grad_accum):
                batch = train_batch(
                    train_tokens,
                    spec.seq_len,
                    tc.batch_size,
                    spec.seed,
                    step,
                    micro_step,
                    runtime.rank,
                    runtime.world_size,
                    tc.grad_accum,
                )
                if runtime.device.type == "cuda":
                    batch = batch.pin_memory().to(runtime.device, non_blocking=True)
                inputs, labels = batch[:, :-1], batch[:, 1:]
                # DDP all-reduces gradients only on the last micro-step of a step.
                last_micro = micro_step == tc.grad_accum - 1
                sync = nullcontext() if last_micro or not runtime.ddp else model.no_sync()
                with sync:
                    with runtime.autocast():
                        loss = model(inputs, labels)
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.detach()
            # Gradients here are already averaged over ranks, so the clip is global.
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip)
                if tc.grad_clip > 0
                else None
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            window_tokens += tokens_per_step

            if done == 1 or done % LOG_EVERY == 0 or done == tc.steps:
                (mean_loss,) = _all_reduce_sum([float(loss_sum) / tc.grad_accum], runtime)
                last_loss = mean_loss / runtime.world_size
                now = time.perf_counter()
                tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                row = {
                    "step": done,
                    "loss": last_loss,
                    "lr": lr,
                    "tokens": done * tokens_per_step,
                    "tokens_per_s": tokens_per_s,
                }
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                log(row)
                bar.update(bar.task_ids[0], loss=f"{last_loss:.4f}", tps=f"{tokens_per_s:,.0f}")
                if plain_lines and (done % plain_every == 0 or done == tc.steps):
                    eta = (tc.steps - done) * tokens_per_step / max(tokens_per_s, 1e-9)
                    print(
                        f"[hdee.train] step {done}/{tc.steps} loss {last_loss:.4f} lr {lr:.2e} "
                        f"{tokens_per_s:,.0f} tok/s ETA {eta:,.0f}s",
                        flush=True,
                    )
                window_start, window_tokens = now, 0
            bar.update(bar.task_ids[0], completed=done)

            paused = False
            if validation and (done % tc.eval_every == 0 or done == tc.steps):
                last_eval = (done, run_eval(done))
                paused = True
            if done % tc.checkpoint_every == 0:
                if runtime.is_main:
                    elapsed = seconds + time.perf_counter() - started
                    ckpt = {
                        "step": done,
                        "lr": lr,
                        "last_loss": last_loss,
                        "seconds": elapsed,
                        "rng": _rng_state(),
                    }
                    save_checkpoint(
                        checkpoints / f"{CHECKPOINT_PREFIX}{done:07d}", raw_model, optimizer, ckpt
                    )
                    for old in _checkpoint_dirs(checkpoints)[: -tc.keep_checkpoints]:
                        shutil.rmtree(old, ignore_errors=True)
                paused = True
            if paused:  # tokens/s measures training, not evaluation or checkpoint writing
                window_start = time.perf_counter()
                window_tokens = 0
            if stop_after is not None and done >= stop_after and done < tc.steps:
                if metrics_file is not None and writer is not None:
                    metrics_file.close()
                    writer.close()
                return {"finished": False, "step": done}

    # ---- the end: final evaluation, final/ model, result.json (last)
    if last_eval is not None and last_eval[0] == tc.steps:
        final_eval = last_eval[1]
    else:
        final_eval = run_eval(tc.steps)
    total_seconds = seconds + time.perf_counter() - started
    result = {
        "kind": spec.kind,
        "steps": tc.steps,
        "tokens": tc.steps * tokens_per_step,
        "seconds": total_seconds,
        "final_loss": last_loss,
        "validation": final_eval,
        "flops": flops_per_token * tc.steps * tokens_per_step,
        "parameters": total_params,
        "non_embedding_parameters": non_embedding,
        "world_size": runtime.world_size,
    }
    if runtime.is_main:
        assert metrics_file is not None and writer is not None
        metrics_file.close()
        writer.close()
        save_model(raw_model, output / "final")
        write_json(output / "result.json", result)
    if runtime.ddp:
        dist.barrier()  # no rank returns before the result exists
    return result


def _check_same_architecture(source: str, loaded: LlamaConfig, wanted: LlamaConfig) -> None:
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "tie_word_embeddings",
    )
    diffs = {k: (getattr(loaded, k), getattr(wanted, k)) for k in keys}
    diffs = {k: v for k, v in diffs.items() if v[0] != v[1]}
    if diffs:
        raise ValueError(
            f"{source}: init_from model differs from the spec's model in {diffs} (loaded, spec)"
        )


def main_train(spec_path: str | Path) -> dict[str, Any]:
    """Entry point of `hdee train SPEC.json` and `python -m hdee.train SPEC.json`."""
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise SystemExit(f"{spec_path}: spec file not found")
    spec = TrainSpec.model_validate(read_json(spec_path))
    return run_training(spec, progress=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m hdee.train SPEC.json")
    outcome = main_train(sys.argv[1])
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(outcome, indent=2))
