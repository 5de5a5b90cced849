"""`training.compile: auto`: the decision maths, the job ids it keeps, and the switch inside a
job (with torch.compile replaced by a recorder: a real compile costs 40 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hdee import compiling
from hdee.checkpoint import checkpoint_dirs, load_checkpoint
from hdee.compiling import CompileState, compile_pays, decide
from hdee.config import TrainingConfig
from hdee.layout import JobLayout
from hdee.records import JobResult
from hdee.train import run_training
from train_helpers import tiny_spec


def test_compile_pays_only_when_the_saving_clearly_beats_the_cost() -> None:
    # 1,000 steps of 0.3 s at 1.5x save 100 s: more than 2 x 40 s, less than 2 x 60 s.
    assert compile_pays(1000, 0.3, 40.0, 1.5)
    assert not compile_pays(1000, 0.3, 60.0, 1.5)
    assert compile_pays(1000, 0.3, 60.0, 1.5, margin=1.0)
    assert not compile_pays(0, 0.3, 1.0, 1.5)  # nothing left to speed up
    assert not compile_pays(10**6, 0.3, 1.0, 1.0)  # no speedup, no gain
    assert not compile_pays(10**6, 0.0, 1.0, 2.0)


def test_decide_names_its_reason() -> None:
    long_job = decide("cpu", 20_000, 0.05, None, warm_cache=False)
    assert long_job.compile and long_job.reason.startswith("compiles: 20,000 steps left")
    demo_job = decide("cpu", 40, 0.05, None, warm_cache=False)
    assert not demo_job.compile and "against about 50 s to compile" in demo_job.reason
    # A warm inductor cache makes a shorter job worth compiling.
    steps = 2_000  # 2,000 x 50 ms x (1 - 1/1.35) = 26 s: over 2 x 10 s, under 2 x 50 s
    assert decide("cpu", steps, 0.05, None, warm_cache=True).compile
    assert not decide("cpu", steps, 0.05, None, warm_cache=False).compile
    no_compiler = decide("cpu", 10**6, 1.0, "no C++ compiler found", warm_cache=True)
    assert not no_compiler.compile and no_compiler.reason == "stays eager: no C++ compiler found"


def test_compiler_missing_without_a_cpp_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    assert "no C++ compiler" in (compiling.compiler_missing("cpu") or "")


def test_auto_is_the_default_and_keeps_job_ids() -> None:
    # auto hashes as false: the ids of jobs made before auto existed stay the same.
    assert TrainingConfig().compile == "auto"
    auto, off, on = (TrainingConfig(compile=c).weight_settings() for c in ("auto", False, True))
    assert auto == off and on != off and on["compile"] is True
    with pytest.raises(ValueError, match="compile"):
        TrainingConfig(compile="sometimes")


def test_the_decision_step_is_fixed_so_a_killed_job_decides_at_the_same_step() -> None:
    state = CompileState("auto", decided=False)
    assert [state.decision_after(s) for s in (0, 2, 3)] == [4, 4, 4]
    assert state.decision_after(4) == 4 + compiling.TIMED_STEPS + 1  # resumed past it
    restarted = CompileState.at_start(
        "auto", {"compile_decided": True, "compile_from_step": 4}, 8, "cpu", False
    )
    assert restarted.decided and restarted.compiles_at(8)
    assert not CompileState.at_start("auto", {}, 0, "cpu", ddp=True).compiles_at(10**6)
    assert not CompileState.at_start(False, {}, 0, "cpu", ddp=False).compiles_at(0)


class _Recorder:
    """Stands in for torch.compile: returns the module itself (eager maths, so weights are
    comparable bit for bit) and counts the calls; `fail` makes the compiled call raise."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, module: torch.nn.Module):
        self.calls += 1
        if not self.fail:
            return module

        def broken(*args):
            raise RuntimeError("inductor: C++ compile failed\nlong compiler output")

        return broken


def _weights(job_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(job_dir / "final" / "model.safetensors"))


def test_auto_stays_eager_on_a_short_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(compiling.torch, "compile", recorder)
    result = run_training(tiny_spec(tmp_path, compile="auto"), progress=False)
    assert result is not None and result.compiled_from_step is None and recorder.calls == 0


def test_auto_switches_at_its_step_and_a_resume_keeps_the_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    recorder = _Recorder()
    monkeypatch.setattr(compiling.torch, "compile", recorder)
    monkeypatch.setattr(compiling, "compile_pays", lambda *args, **kwargs: True)
    monkeypatch.setattr(compiling, "compiler_missing", lambda device: None)
    import hdee.train

    monkeypatch.setattr(hdee.train, "compiler_missing", lambda device: None)
    spec = tiny_spec(tmp_path, compile="auto")
    whole = run_training(spec, progress=False)
    assert whole is not None and whole.compiled_from_step == compiling.TIMED_STEPS + 1
    assert recorder.calls == 1 and "compile: auto compiles:" in capsys.readouterr().out
    state = load_checkpoint(checkpoint_dirs(JobLayout(Path(spec.output_dir)))[-1], "cpu", "eager")[
        1
    ]
    assert state["compile_decided"] and state["compile_from_step"] == 4

    # Killed after the decision: the resume compiles at once, and the weights are the same.
    parts = tiny_spec(tmp_path, "parts", compile="auto")
    assert run_training(parts, progress=False, stop_after=9) is None
    resumed = run_training(parts, progress=False)
    assert resumed is not None and resumed.compiled_from_step == 4 and recorder.calls == 3
    whole_weights, resumed_weights = (
        _weights(Path(spec.output_dir)),
        _weights(Path(parts.output_dir)),
    )
    assert all(torch.equal(whole_weights[k], resumed_weights[k]) for k in whole_weights)


def test_a_failing_compile_falls_back_to_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(compiling.torch, "compile", _Recorder(fail=True))
    monkeypatch.setattr(compiling, "compiler_missing", lambda device: None)
    result = run_training(tiny_spec(tmp_path, "forced", compile=True), progress=False)
    assert result is not None and result.compiled_from_step is None
    err = capsys.readouterr().err
    assert "torch.compile failed, training goes on eagerly: RuntimeError: inductor" in err
    assert "long compiler output" not in err  # one line, not the compiler's log
    eager = run_training(tiny_spec(tmp_path, "eager", compile=False), progress=False)
    assert eager is not None
    forced, plain = _weights(tmp_path / "forced"), _weights(tmp_path / "eager")
    assert all(torch.equal(forced[k], plain[k]) for k in forced)
    assert JobResult.read(JobLayout(tmp_path / "forced").result).compiled_from_step is None
