"""One training job: a seed (from scratch) or an expert (branched from a checkpoint).

`run_training` reads top to bottom in three parts: `build` (data, model, optimizer, resume),
`train_steps` (the nanoGPT-style loop) and `finish` (final evaluation, `final/`, result.json).
A job is described completely by a `TrainSpec` and lives in its own directory (`JobLayout`):

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
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from transformers import LlamaConfig, LlamaForCausalLM

from hdee.atomic import read_json, write_json
from hdee.checkpoint import (
    checkpoint_dirs,
    cleanup_temporaries,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from hdee.compiling import (
    CompileOrEager,
    CompileState,
    compiler_missing,
    decide,
    inductor_cache_is_warm,
)
from hdee.config import ConfigError, TrainingConfig, UsageError
from hdee.console import progress as progress_bar
from hdee.console import warn
from hdee.data.loaders import eval_batches, train_batch
from hdee.data.tokens import load_tokens, read_manifest
from hdee.integrity import verify_model_dir, weights_sha256
from hdee.layout import JobLayout
from hdee.loss import CausalLMLoss
from hdee.metrics import MetricsLogger
from hdee.model import attention_implementation, attention_set_to, load_model, save_model
from hdee.records import JobResult, ValidationScore
from hdee.scoring import (
    autocast,
    label_log_probs,
    resolve_device,
    resolve_precision,
    validation_precision,
)
from hdee.shapes import parameter_counts, training_flops_per_token

LOG_EVERY = 10  # optimizer steps between training-loss log lines (plus the first and last)


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm or weight: the job stops before anything (a log row,
    validation, a checkpoint, `final/`) consumes it. Deterministic, so a retry fails the same."""


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
        """What determines the weights: the spec without where it lives (a moved job directory
        still resumes) and without cadence or device (a resumed job may change them)."""
        data = self.model_dump(mode="json")
        data.pop("output_dir")
        data["training"] = self.training.weight_settings()
        return data


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
class Runtime:
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
        return autocast(self.device, self.amp_dtype)


def setup_runtime(training: TrainingConfig) -> Runtime:
    """Device, precision (`resolve_precision`) and the DDP process group of this process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(training.device)
    if device.type == "cuda":
        # One GPU per process under torchrun; an explicit index applies to single-process runs.
        index = local_rank if world_size > 1 or device.index is None else device.index
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    owns_group = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    amp_dtype = resolve_precision(training.precision, device)
    return Runtime(rank, local_rank, world_size, device, amp_dtype, owns_group)


def _all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    if not runtime.ddp:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ----------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: Any,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    runtime: Runtime | None = None,
) -> ValidationScore:
    """Mean loss and perplexity on the first `max_batches` fixed validation batches; ranks
    split the batches and sum (loss, count), so every rank gets the same numbers. Without a
    runtime: one process, fp32, on the model's device."""
    if runtime is None:
        device = next(model.parameters()).device
        runtime = Runtime(0, 0, 1, device, None, owns_group=False)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    precision = validation_precision(runtime.device, runtime.amp_dtype)
    # The attention `hdee evaluate` would load the model with, so the numbers are its numbers.
    attention = attention_implementation(runtime.device, precision or torch.float32, seq_len)
    batches = eval_batches(tokens, seq_len, batch_size, max_windows=max_batches * batch_size)
    with attention_set_to(model, attention), autocast(runtime.device, precision):
        for index, batch in enumerate(batches):
            if index % runtime.world_size != runtime.rank:
                continue
            log_probs = label_log_probs(model, batch.to(runtime.device))
            total -= float(log_probs.double().sum())
            count += log_probs.numel()
    total, count = _all_reduce_sum([total, count], runtime)
    model.train(was_training)
    mean = total / max(count, 1.0)
    return ValidationScore(loss=mean, perplexity=math.exp(min(mean, 700.0)))


# ----------------------------------------------------------------------------------------------
# Part 1: build everything the loop needs


@dataclass
class Job:
    """A built training job: what `train_steps` and `finish` work on."""

    spec: TrainSpec
    runtime: Runtime
    layout: JobLayout
    raw_model: LlamaForCausalLM  # the model itself (saved, evaluated, clipped)
    model: torch.nn.Module  # what is called for the loss: raw_model wrapped (loss, compile, DDP)
    optimizer: torch.optim.Optimizer
    train_tokens: np.ndarray
    validation: dict[str, np.ndarray]
    start_step: int
    resumed: dict[str, Any] = field(default_factory=dict)  # trainer state of the checkpoint
    started: float = field(default_factory=time.perf_counter)
    # The eager loss module (what `model` wraps) and the compile choice (hdee.compiling).
    loss_module: torch.nn.Module | None = None
    compile: CompileState = field(default_factory=lambda: CompileState(False))

    @property
    def training(self) -> TrainingConfig:
        return self.spec.training

    @property
    def tokens_per_step(self) -> int:
        tc = self.training
        return tc.batch_size * self.spec.seq_len * tc.grad_accum * self.runtime.world_size

    @property
    def flops_per_token(self) -> float:
        return training_flops_per_token(self.raw_model.config, self.spec.seq_len)

    def elapsed(self) -> float:
        """Training seconds, including those before the checkpoint we resumed from."""
        return float(self.resumed.get("seconds", 0.0)) + time.perf_counter() - self.started

    def validate(self) -> dict[str, ValidationScore]:
        tc, spec = self.training, self.spec
        return {
            name: evaluate(
                self.raw_model, tokens, spec.seq_len, tc.batch_size, tc.eval_batches, self.runtime
            )
            for name, tokens in self.validation.items()
        }


def build(spec: TrainSpec, runtime: Runtime) -> Job:
    """Check the job directory, load the data, and build the model and optimizer: resumed
    from the newest readable checkpoint, else branched from `init_from`, else initialised."""
    layout = JobLayout(Path(spec.output_dir))
    _check_spec(layout, spec)
    if runtime.is_main:
        layout.root.mkdir(parents=True, exist_ok=True)
        cleanup_temporaries(layout)
        if not layout.spec.exists() or read_json(layout.spec) != spec.model_dump(mode="json"):
            write_json(layout.spec, spec.model_dump(mode="json"))  # e.g. a changed cadence

    train_tokens = load_tokens(spec.train_tokens)
    validation = {name: load_tokens(path) for name, path in spec.validation.items()}
    config = LlamaConfig.from_dict(dict(spec.model))
    _check_data(spec, config)

    attn = attention_implementation(
        runtime.device, runtime.amp_dtype or torch.float32, spec.seq_len
    )
    model, resumed, optimizer_state = _resume(layout, runtime, attn)
    if model is None:
        model = _initial_model(spec, config, runtime, attn)
    model.train()
    optimizer = _build_optimizer(model, spec.training)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    # What DDP and compile wrap: the model and its loss, so a chunked loss syncs like any.
    loss_module = CausalLMLoss(model, spec.training.loss_chunk_tokens)
    start_step = int(resumed.get("step", 0))
    compile_state = CompileState.at_start(
        spec.training.compile, resumed, start_step, runtime.device.type, runtime.ddp
    )
    wrapped: torch.nn.Module = loss_module
    if compile_state.compiles_at(start_step):
        wrapped = CompileOrEager(loss_module, compile_state.fell_back)
    if runtime.ddp:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)
    job = Job(
        spec=spec,
        runtime=runtime,
        layout=layout,
        raw_model=model,
        model=wrapped,
        optimizer=optimizer,
        train_tokens=train_tokens,
        validation=validation,
        start_step=start_step,
        resumed=resumed,
        loss_module=loss_module,
        compile=compile_state,
    )
    if runtime.is_main:
        _print_summary(job, attn)
    return job


def _check_spec(layout: JobLayout, spec: TrainSpec) -> None:
    if layout.spec.exists():
        try:
            stored = TrainSpec.model_validate(read_json(layout.spec)).identity()
        except ValidationError:
            stored = None
        if stored != spec.identity():
            raise ValueError(
                f"{layout.spec}: this job directory holds a different job; use a new output_dir "
                "(or delete the directory to start over)"
            )


def _check_data(spec: TrainSpec, config: LlamaConfig) -> None:
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


def _resume(
    layout: JobLayout, runtime: Runtime, attn: str
) -> tuple[LlamaForCausalLM | None, dict[str, Any], dict[str, Any] | None]:
    """(model, trainer state, optimizer state) of the newest readable checkpoint, or
    (None, {}, None) when there is none."""
    for directory in reversed(checkpoint_dirs(layout)):
        try:
            model, state, optimizer_state = load_checkpoint(directory, runtime.device, attn)
        except ValueError as error:
            warn(f"skipping unreadable checkpoint: {error}")
            continue
        set_rng_state(state.get("rng", {"torch": torch.get_rng_state().tolist()}))
        return model, state, optimizer_state
    return None, {}, None


def _initial_model(
    spec: TrainSpec, config: LlamaConfig, runtime: Runtime, attn: str
) -> LlamaForCausalLM:
    if spec.init_from:
        # The "branch" of Branch-Train-Merge: start from the parent's weights, as the parent
        # recorded them when it finished.
        verify_model_dir(spec.init_from)
        model = load_model(spec.init_from, runtime.device, torch.float32, attn)
        _check_same_architecture(spec.init_from, model.config, config)
        return model
    config._attn_implementation = attn
    # Seeded init on the CPU generator (same weights on any device and every rank), without
    # disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    return model.to(runtime.device)


def _build_optimizer(model: torch.nn.Module, training: TrainingConfig) -> torch.optim.AdamW:
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


def _print_summary(job: Job, attn: str) -> None:
    """What the job will cost, before it runs."""
    spec, tc, runtime = job.spec, job.training, job.runtime
    total_params, non_embedding = parameter_counts(job.raw_model.config)
    tokens = job.tokens_per_step
    precision = "bf16 autocast" if runtime.amp_dtype else "fp32"
    print(
        f"[hdee.train] {spec.kind} job -> {job.layout.root}\n"
        f"  parameters {total_params:,} ({non_embedding:,} non-embedding), "
        f"vocab {job.raw_model.config.vocab_size:,}\n"
        f"  tokens/step {tokens:,} = batch {tc.batch_size} x seq {spec.seq_len} x "
        f"accum {tc.grad_accum} x ranks {runtime.world_size}; {tc.steps:,} steps = "
        f"{tokens * tc.steps:,} tokens\n"
        f"  training FLOPs/token {job.flops_per_token:.3e}, total "
        f"{job.flops_per_token * tokens * tc.steps:.3e}\n"
        f"  device {runtime.device}, {precision}, attention {attn}, "
        f"compile {str(tc.compile).lower()} ({job.compile.note or 'off'})"
        + (f"; resuming at step {job.start_step}" if job.start_step else ""),
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# Part 2: the step loop


@dataclass
class LoopOutcome:
    step: int  # optimizer steps done
    last_loss: float | None
    last_eval: tuple[int, dict[str, ValidationScore]] | None  # (step, scores) of the last one

    def finished(self, steps: int) -> bool:
        return self.step >= steps


def train_steps(
    job: Job, metrics: MetricsLogger, progress: bool, stop_after: int | None = None
) -> LoopOutcome:
    """Optimizer steps from `job.start_step` to the end (or to `stop_after`), with logging,
    validation every `eval_every` steps and a checkpoint every `checkpoint_every` steps."""
    tc, runtime, spec = job.training, job.runtime, job.spec
    outcome = LoopOutcome(job.start_step, job.resumed.get("last_loss"), None)
    window_start, window_tokens = time.perf_counter(), 0
    # (step, lr, loss, grad norm) as device tensors, checked for finiteness only where the loop
    # reads the device anyway (log rows, validation, checkpoints): no extra sync per step.
    unchecked: list[tuple[int, float, torch.Tensor, torch.Tensor | None]] = []
    timed: list[float] = []  # seconds of the eager steps compile: auto decides from
    with progress_bar(
        f"{spec.kind} {job.layout.root.name}",
        total=tc.steps,
        completed=job.start_step,
        unit="steps",
        enabled=progress and runtime.is_main,
    ) as bar:
        for step in range(job.start_step, tc.steps):
            lr = lr_at(step, tc)
            started = time.perf_counter()
            loss_sum, grad_norm = _optimizer_step(job, step, lr)  # tensors: no device sync
            done = outcome.step = step + 1
            if not job.compile.decided:
                if runtime.device.type == "cuda":
                    torch.cuda.synchronize()  # only while timing eager steps for compile: auto
                timed.append(time.perf_counter() - started)
                if done == job.compile.decision_after(job.start_step):
                    _decide_compile(job, done, timed)
            window_tokens += job.tokens_per_step
            unchecked.append((done, lr, loss_sum, grad_norm))

            log_due = done == 1 or done % LOG_EVERY == 0 or done == tc.steps
            eval_due = bool(job.validation) and (done % tc.eval_every == 0 or done == tc.steps)
            checkpoint_due = done % tc.checkpoint_every == 0
            if log_due or eval_due or checkpoint_due:
                _check_finite(job, unchecked, weights=eval_due or checkpoint_due)
                unchecked.clear()
            if log_due:
                (mean_loss,) = _all_reduce_sum([float(loss_sum) / tc.grad_accum], runtime)
                outcome.last_loss = mean_loss / runtime.world_size
                now = time.perf_counter()
                tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                row = {
                    "step": done,
                    "loss": outcome.last_loss,
                    "lr": lr,
                    "tokens": done * job.tokens_per_step,
                    "tokens_per_s": tokens_per_s,
                }
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                metrics.log(row)
                bar.update(
                    loss=f"{outcome.last_loss:.4f}",
                    lr=f"{lr:.2e}",
                    tok_per_s=f"{tokens_per_s:,.0f}",
                )
                window_start, window_tokens = now, 0
            bar.update(done)

            paused = False
            if eval_due:
                outcome.last_eval = (done, _log_validation(job, metrics, done))
                paused = True
            if checkpoint_due:
                if runtime.is_main:
                    _save_step_checkpoint(job, done, lr, outcome.last_loss)
                paused = True
            if paused:  # tokens/s measures training, not evaluation or checkpoint writing
                window_start, window_tokens = time.perf_counter(), 0
            if stop_after is not None and done >= stop_after and done < tc.steps:
                break
    return outcome


def _decide_compile(job: Job, done: int, timed: list[float]) -> None:
    """`compile: auto`, after `done` steps: choose from the timed eager steps (this process's
    first left out as warm-up when others exist) and run compiled from the next step on."""
    seconds = timed[1:] or timed
    eager = sum(seconds) / len(seconds)
    device = job.runtime.device.type
    decision = decide(
        device, job.training.steps - done, eager, compiler_missing(device), inductor_cache_is_warm()
    )
    job.compile.decided, job.compile.note = True, decision.reason
    if decision.compile:
        job.compile.from_step = done
        assert job.loss_module is not None
        job.model = CompileOrEager(job.loss_module, job.compile.fell_back)
    if job.runtime.is_main:
        print(f"[hdee.train] compile: auto {decision.reason}", flush=True)


def _check_finite(
    job: Job,
    unchecked: list[tuple[int, float, torch.Tensor, torch.Tensor | None]],
    weights: bool,
) -> None:
    """Raise TrainingDiverged naming the first step whose loss or gradient norm is not finite
    (and, with `weights`, when the weights the next validation or checkpoint would read are
    not). One device read for all unchecked steps; under DDP every rank raises together."""
    if not unchecked:
        return
    values = [loss for _, _, loss, _ in unchecked]
    values += [norm for _, _, _, norm in unchecked if norm is not None]
    bad = ~torch.isfinite(torch.stack([v.float() for v in values]))
    if weights:
        # The last step's update can overflow with a finite loss and gradient before it.
        params = [p.detach() for p in job.raw_model.parameters()]
        bad = torch.cat([bad, ~torch.stack([torch.isfinite(p).all() for p in params]).all()[None]])
    flags = bad.tolist()
    (bad_ranks,) = _all_reduce_sum([float(any(flags))], job.runtime)
    if not bad_ranks:
        return
    step, lr, loss, norm = unchecked[-1]
    weights_only = ", and the weights after it are not finite"
    for entry in unchecked:
        entry_loss, entry_norm = entry[2], entry[3]
        if not math.isfinite(float(entry_loss)) or (
            entry_norm is not None and not math.isfinite(float(entry_norm))
        ):
            step, lr, loss, norm = entry
            weights_only = ""
            break
    what = f"loss {float(loss) / job.training.grad_accum:.6g}"
    what += f", gradient norm {float(norm):.6g}" if norm is not None else ""
    what += weights_only
    raise TrainingDiverged(
        f"{job.spec.kind} job {job.layout.root.name} diverged at step {step}: {what}, "
        f"learning rate {lr:.6g} (not finite: nothing from this step on was logged or saved, "
        f"{job.layout.root} keeps its earlier checkpoints). Lower training.lr, lengthen "
        "training.warmup_steps or set training.grad_clip"
    )


def _optimizer_step(job: Job, step: int, lr: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over `grad_accum` micro-batches: (summed micro-batch loss, gradient
    norm before clipping or None when clipping is off), as tensors on the device."""
    tc, runtime, spec = job.training, job.runtime, job.spec
    for group in job.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=runtime.device)
    for micro_step in range(tc.grad_accum):
        batch = train_batch(
            job.train_tokens,
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
        sync = nullcontext() if last_micro or not runtime.ddp else job.model.no_sync()
        with sync:
            with runtime.autocast():
                loss = job.model(inputs, labels)
            (loss / tc.grad_accum).backward()
        loss_sum += loss.detach()
    # Gradients here are already averaged over ranks, so the clip is global.
    grad_norm = None
    if tc.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(job.raw_model.parameters(), tc.grad_clip)
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def _log_validation(job: Job, metrics: MetricsLogger, step: int) -> dict[str, ValidationScore]:
    scores = job.validate()
    if scores:
        row: dict[str, Any] = {"step": step, "tokens": step * job.tokens_per_step}
        for name, score in scores.items():
            row[f"val/{name}/loss"] = score.loss
            row[f"val/{name}/ppl"] = score.perplexity
        metrics.log(row)
    return scores


def _save_step_checkpoint(job: Job, step: int, lr: float, last_loss: float | None) -> None:
    state = {
        "step": step,
        "lr": lr,
        "last_loss": last_loss,
        "seconds": job.elapsed(),
        "rng": rng_state(),
        **job.compile.checkpoint_state(),
    }
    save_checkpoint(job.layout.checkpoint(step), job.raw_model, job.optimizer, state)
    prune_checkpoints(job.layout, job.training.keep_checkpoints)


# ----------------------------------------------------------------------------------------------
# Part 3: finish


def finish(job: Job, outcome: LoopOutcome, metrics: MetricsLogger) -> JobResult:
    """Final validation (unless the last step just ran one), `final/`, then result.json last."""
    tc = job.training
    if outcome.last_eval is not None and outcome.last_eval[0] == tc.steps:
        final_eval = outcome.last_eval[1]
    else:  # resumed from a checkpoint of the last step
        final_eval = _log_validation(job, metrics, tc.steps)
    total_params, non_embedding = parameter_counts(job.raw_model.config)
    if job.runtime.is_main:
        save_model(job.raw_model, job.layout.final)
    if job.runtime.ddp:
        dist.barrier()  # final/ exists before any rank goes on
    result = JobResult(
        weights_sha256=weights_sha256(job.layout.final),
        kind=job.spec.kind,
        steps=tc.steps,
        tokens=tc.steps * job.tokens_per_step,
        seconds=job.elapsed(),
        final_loss=outcome.last_loss,
        validation=final_eval,
        flops=job.flops_per_token * tc.steps * job.tokens_per_step,
        parameters=total_params,
        non_embedding_parameters=non_embedding,
        world_size=job.runtime.world_size,
        device=job.runtime.device.type,
        precision="bf16" if job.runtime.amp_dtype == torch.bfloat16 else "fp32",
        compiled_from_step=job.compile.from_step,
    )
    if job.runtime.is_main:
        result.write(job.layout.result)
    if job.runtime.ddp:
        dist.barrier()  # no rank returns before the result exists
    return result


# ----------------------------------------------------------------------------------------------
# The job


def run_training(
    spec: TrainSpec, progress: bool = True, *, stop_after: int | None = None
) -> JobResult | None:
    """Run (or resume, or skip) one training job and return its result (result.json).

    `stop_after`: stop once this global step is reached, writing nothing more, as if the process
    had been killed there (tests and time-slicing schedulers use it); returns None then.
    """
    layout = JobLayout(Path(spec.output_dir))
    if layout.is_done():
        return JobResult.read(layout.result)
    runtime = setup_runtime(spec.training)
    try:
        job = build(spec, runtime)
        with MetricsLogger(layout, job.start_step, enabled=runtime.is_main) as metrics:
            outcome = train_steps(job, metrics, progress, stop_after)
            if not outcome.finished(spec.training.steps):
                return None
            return finish(job, outcome, metrics)
    finally:
        if runtime.owns_group:
            dist.destroy_process_group()


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


def main_train(spec_path: str | Path) -> JobResult | None:
    """Entry point of `hdee train SPEC.json` and `python -m hdee.train SPEC.json`."""
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise UsageError(f"{spec_path}: spec file not found")
    try:
        spec = TrainSpec.model_validate(read_json(spec_path))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ConfigError(
            f"{spec_path}: not a training spec ({where}: {first['msg']}; {error.error_count()} "
            "problem(s)); `hdee jobs CONFIG STAGE` writes them"
        ) from None
    return run_training(spec, progress=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m hdee.train SPEC.json")
    try:
        outcome = main_train(sys.argv[1])
    except (UsageError, ConfigError) as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) == 0 and outcome is not None:
        print(json.dumps(outcome.model_dump(mode="json"), indent=2))
