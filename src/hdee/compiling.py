"""When `torch.compile` pays: `training.compile: auto` (the default) decides per job.

Compiling a small Llama with inductor costs 40-50 s on a CPU the first time (about 7 s from
inductor's on-disk cache) and then makes each step about 1.35x faster (docs/speed.md). So it
pays on a job of several minutes and costs on the demo's jobs of seconds. A job with
`compile: auto` times a few eager steps, estimates what compiling would save over the steps it
has left, and compiles only when that clearly exceeds the expected compile time; it never
compiles where no C++ compiler (CPU) or Triton (CUDA) is found, and when compiling fails at the
first compiled step it goes on eagerly. What it chose is recorded in every checkpoint (a
resumed job keeps the choice) and in result.json (`compiled_from_step`).

The maths is pure (`compile_pays`, `decide`) so tests need no compiler; `CompileOrEager` is the
wrapper that falls back.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hdee.console import warn

# Seconds a first compile takes with an empty inductor cache, and the step-time speedup after
# it, measured on the models this toolkit trains (docs/speed.md: 37-48 s cold on a 2-core CPU,
# 1.37-1.40x; GPUs compile in about as long and gain about as much). Conservative on purpose: a
# wrong "no" costs a little speed, a wrong "yes" costs a minute on a job of seconds.
COLD_COMPILE_SECONDS = {"cpu": 50.0, "cuda": 60.0}
WARM_COMPILE_SECONDS = {"cpu": 10.0, "cuda": 15.0}  # inductor's cache already holds kernels
EXPECTED_SPEEDUP = {"cpu": 1.35, "cuda": 1.3}
# Compile only when the expected saving is this many times the compile time: the estimate of
# both is rough, and near break-even compiling gains nothing worth its risk.
MARGIN = 2.0
# Eager steps timed before deciding; the job's first step is not among them (warm-up).
TIMED_STEPS = 3


def compile_pays(
    steps_left: int,
    eager_step_seconds: float,
    compile_seconds: float,
    speedup: float,
    margin: float = MARGIN,
) -> bool:
    """Whether compiling now saves more than `margin` times what it costs: the time the
    remaining steps would save at `speedup`, against `compile_seconds`."""
    if steps_left <= 0 or speedup <= 1.0 or eager_step_seconds <= 0:
        return False
    saved = steps_left * eager_step_seconds * (1.0 - 1.0 / speedup)
    return saved > margin * compile_seconds


def compiler_missing(device_type: str) -> str | None:
    """Why inductor cannot compile here (None when it can): a C++ compiler on the CPU, Triton
    on CUDA, and a torch with torch.compile at all."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(name and shutil.which(name) for name in compilers):
        return "no C++ compiler found (g++, c++, clang++ or $CXX)"
    return None


def inductor_cache_is_warm() -> bool:
    """Whether inductor's on-disk cache holds compiled kernels (a second compile is ~7x
    faster). The cache directory is inductor's own choice ($TORCHINDUCTOR_CACHE_DIR or a
    per-user temporary directory)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        root = Path(cache_dir())
    except (ImportError, AttributeError, OSError):
        return False
    return root.is_dir() and any(root.rglob("*.so"))


@dataclass(frozen=True)
class CompileDecision:
    compile: bool
    reason: str  # one line for the job's log


def decide(
    device_type: str,
    steps_left: int,
    eager_step_seconds: float,
    missing: str | None,
    warm_cache: bool,
) -> CompileDecision:
    """`compile: auto`'s choice after timing eager steps (pure: every input is given)."""
    if missing is not None:
        return CompileDecision(False, f"stays eager: {missing}")
    kind = "cuda" if device_type == "cuda" else "cpu"
    cost = (WARM_COMPILE_SECONDS if warm_cache else COLD_COMPILE_SECONDS)[kind]
    speedup = EXPECTED_SPEEDUP[kind]
    saved = steps_left * eager_step_seconds * (1.0 - 1.0 / speedup)
    estimate = (
        f"{steps_left:,} steps left at {eager_step_seconds * 1e3:.1f} ms would save about "
        f"{saved:.0f} s at {speedup:g}x, against about {cost:.0f} s to compile "
        f"({'warm' if warm_cache else 'empty'} inductor cache)"
    )
    if compile_pays(steps_left, eager_step_seconds, cost, speedup):
        return CompileDecision(True, f"compiles: {estimate}")
    return CompileDecision(False, f"stays eager: {estimate}")


class CompileOrEager(torch.nn.Module):
    """`module` compiled, falling back to `module` itself when the first compiled call fails
    (a broken compiler, an unsupported op): the job goes on eagerly instead of dying. Later
    errors are the model's own and propagate. `on_fallback` hears about the switch."""

    def __init__(self, module: torch.nn.Module, on_fallback: Callable[[], None]) -> None:
        super().__init__()
        self.module = module
        # Not a submodule: the compiled wrapper holds the same parameters.
        object.__setattr__(self, "_compiled", torch.compile(module))
        self._state = "untried"  # -> "compiled" or "eager" after the first call
        self._on_fallback = on_fallback

    @property
    def compiled(self) -> bool:
        return self._state != "eager"

    def forward(self, *args: Any) -> Any:
        if self._state == "eager":
            return self.module(*args)
        if self._state == "compiled":
            return self._compiled(*args)
        try:
            out = self._compiled(*args)
        except Exception as error:  # noqa: BLE001 - any compiler failure: fall back, say why
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            warn(
                f"torch.compile failed, training goes on eagerly: {type(error).__name__}: {first_line}"
            )
            self._state = "eager"
            self._on_fallback()
            return self.module(*args)
        self._state = "compiled"
        return out


@dataclass
class CompileState:
    """A job's compile choice: compiled from step `from_step` on (None: eager throughout), or
    not `decided` yet (`compile: auto` before its timed steps). Saved in every checkpoint."""

    setting: bool | str  # training.compile: True, False or "auto"
    from_step: int | None = None
    decided: bool = True
    note: str = ""  # why, for the job's log

    @classmethod
    def at_start(
        cls,
        setting: bool | str,
        resumed: dict[str, Any],
        start_step: int,
        device_type: str,
        ddp: bool,
    ) -> CompileState:
        """The choice a job (re)starts with: a resumed job keeps its recorded choice."""
        if setting is False:
            return cls(setting)
        missing = compiler_missing(device_type)
        if resumed.get("compile_decided"):
            from_step = resumed.get("compile_from_step")
            if from_step is not None and missing is not None:
                return cls(setting, None, True, f"eager: it compiled before, but {missing}")
            return cls(setting, from_step, True, "as before this resume")
        if setting is True:
            if missing is not None:
                return cls(setting, None, True, f"eager: compile: true, but {missing}")
            return cls(setting, start_step, True, "compile: true")
        if ddp:
            # A DDP wrapper cannot be rebuilt around a compiled module mid-job.
            return cls(
                setting, None, True, "eager: compile: auto does not switch a DDP job; set true"
            )
        return cls(setting, None, False, f"decides after {TIMED_STEPS} timed eager steps")

    def decision_after(self, start_step: int) -> int:
        """How many steps done when `auto` decides: always TIMED_STEPS + 1 (the first step is
        warm-up) unless the job resumed past that, so a job killed before deciding decides at
        the same step and compiles from the same one."""
        first = TIMED_STEPS + 1
        return first if start_step < first else start_step + TIMED_STEPS + 1

    def compiles_at(self, step: int) -> bool:
        return self.from_step is not None and step >= self.from_step

    def fell_back(self) -> None:
        self.from_step = None
        self.note = "eager: compiling failed"

    def checkpoint_state(self) -> dict[str, Any]:
        return {"compile_decided": self.decided, "compile_from_step": self.from_step}
