"""`precision: auto`: bf16 where the hardware has bf16 units (CUDA, or a CPU whose flags name
them), fp32 elsewhere; fp32 master weights always; CPU evaluation fp32 on every CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hdee import scoring
from hdee.data.tokens import load_tokens
from hdee.model import load_model
from hdee.scoring import (
    cpu_flags,
    inference_precision,
    label_log_probs,
    resolve_precision,
    validation_precision,
    window_log_probs,
)
from hdee.train import evaluate, run_training, setup_runtime
from train_helpers import tiny_spec

CPU = torch.device("cpu")

EPYC_CPUINFO = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC
flags		: fpu vme sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni
bugs		: sysret_ss_attrs

processor	: 1
flags		: fpu vme sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
SAPPHIRE_RAPIDS_CPUINFO = "vendor_id\t: GenuineIntel\nflags\t\t: avx512f amx_bf16 amx_tile\n"
SKYLAKE_CPUINFO = "vendor_id\t: GenuineIntel\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 bf16\n"


@pytest.mark.parametrize(
    ("cpuinfo", "has_bf16"),
    [
        (EPYC_CPUINFO, True),
        (SAPPHIRE_RAPIDS_CPUINFO, True),
        (SKYLAKE_CPUINFO, False),  # AVX-512 without its BF16 extension: fp32 is faster
        (ARM_CPUINFO, False),  # no x86 flags line: not claimed (unmeasured)
        ("", False),
    ],
)
def test_cpu_bf16_units_come_from_the_flags(cpuinfo: str, has_bf16: bool):
    assert bool(cpu_flags(cpuinfo) & scoring.CPU_BF16_FLAGS) is has_bf16


def test_cpu_flags_of_a_machine_without_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch):
    def unreadable(self: Path, *args: object, **kwargs: object) -> str:
        raise FileNotFoundError(self)

    monkeypatch.setattr(Path, "read_text", unreadable)
    assert cpu_flags() == frozenset()


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_follows_the_cpu_and_explicit_settings_win(
    monkeypatch: pytest.MonkeyPatch, has_bf16: bool
):
    monkeypatch.setattr(scoring, "cpu_has_bf16", lambda: has_bf16)
    bf16_if_units = torch.bfloat16 if has_bf16 else None
    assert resolve_precision("auto", CPU) == bf16_if_units
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) == torch.bfloat16
    # Evaluation on a CPU is fp32 either way: cached log-probs agree across machines.
    assert inference_precision(CPU) is None
    assert validation_precision(CPU, torch.bfloat16) is None


def test_auto_on_a_bf16_cpu_trains_under_bf16_autocast_with_fp32_masters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(scoring, "cpu_has_bf16", lambda: True)
    spec = tiny_spec(tmp_path, "auto", steps=4, eval_every=4, device="cpu", precision="auto")
    assert setup_runtime(spec.training).amp_dtype == torch.bfloat16
    result = run_training(spec, progress=False)
    # bf16 on a CPU trains with eager attention (faster than SDPA's CPU kernel at this length)
    assert "cpu, bf16 autocast, attention eager" in capsys.readouterr().out
    final = load_model(Path(spec.output_dir) / "final")
    assert {p.dtype for p in final.parameters()} == {torch.float32}
    # Training really ran in bf16: an fp32 job of the same spec ends elsewhere.
    fp32 = run_training(
        tiny_spec(tmp_path, "fp32", steps=4, eval_every=4, device="cpu", precision="fp32"),
        progress=False,
    )
    assert result.final_loss != fp32.final_loss
    # ...and validated in fp32 with SDPA: the job's validation loss is exactly what a CPU
    # evaluation of the final weights computes.
    tokens = load_tokens(spec.validation["val"])
    score = evaluate(final, tokens, spec.seq_len, spec.training.batch_size, 2)
    assert score.loss == pytest.approx(result.validation["val"].loss, rel=1e-7)  # bf16: ~1e-3


def test_cpu_evaluation_is_fp32_on_a_bf16_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(scoring, "cpu_has_bf16", lambda: True)
    spec = tiny_spec(tmp_path, "job", steps=2, eval_every=2, device="cpu", precision="fp32")
    run_training(spec, progress=False)
    model = load_model(Path(spec.output_dir) / "final")
    tokens = torch.randint(0, model.config.vocab_size, (4 * 33,)).numpy()
    scored = window_log_probs(model, tokens, 32, 4, None)
    windows = torch.as_tensor(tokens[: 4 * 32 + 1].astype("int64"))
    batch = torch.stack([windows[i * 32 : i * 32 + 33] for i in range(4)])
    assert torch.equal(scored, label_log_probs(model, batch))  # no autocast: exactly fp32


def test_validation_scores_with_the_attention_evaluate_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A model trained with eager attention (bf16 on a CPU) is validated with SDPA in fp32, as
    `hdee evaluate` loads it, and trains with eager attention again afterwards."""
    import transformers.models.llama.modeling_llama as llama

    from train_helpers import random_llama

    model = random_llama(64, seed=1)
    model.set_attn_implementation("eager")
    calls = {"eager": 0}
    real_eager = llama.eager_attention_forward

    def counting_eager(*args, **kwargs):
        calls["eager"] += 1
        return real_eager(*args, **kwargs)

    monkeypatch.setattr(llama, "eager_attention_forward", counting_eager)
    tokens = torch.randint(0, 64, (8 * 17,)).numpy()
    evaluate(model, tokens, 16, 4, 2)
    assert calls["eager"] == 0
    assert model.config._attn_implementation == "eager"
    model(input_ids=torch.randint(0, 64, (1, 8)))
    assert calls["eager"] == 2  # one per layer: eager again outside validation


def test_batches_scored_side_by_side_equal_scoring_them_one_after_another() -> None:
    """On a CPU `window_log_probs` scores batches in a thread pool, one thread each: the order
    and values must be those of the serial loop (each batch's numbers are its own)."""
    from hdee.scoring import torch_threads
    from train_helpers import random_llama

    model = random_llama(64, seed=3)
    tokens = torch.randint(
        0, model.config.vocab_size, (7 * 16 + 1,), generator=torch.Generator().manual_seed(0)
    ).numpy()
    with torch_threads(1):
        serial = window_log_probs(model, tokens, 16, 2, None, None)
    with torch_threads(2):
        side_by_side = window_log_probs(model, tokens, 16, 2, None, None)
    assert serial.shape == (7, 16)
    assert torch.equal(side_by_side, serial)
