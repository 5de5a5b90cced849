"""Where a benchmark ran: one header line every benchmark prints before its numbers.

A speed ratio is a property of one machine (a bf16 loop is twice as fast as fp32 on a CPU with
bf16 units and several times slower on one without), so every result is printed under the CPU
model, its core count, torch's threads, whether hdee treats the CPU as bf16-capable, the GPU if
any, and optionally the measured matmul peak in fp32 and bf16.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from hdee.scoring import CPU_BF16_FLAGS, cpu_flags, cpu_has_bf16


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_peak_gflops(
    dtype: torch.dtype, size: int = 1024, seconds: float = 1.0, device: str = "cpu"
) -> float:
    """Measured GFLOP/s of square `size` matmuls in `dtype`: the best of a few timed bursts
    after a warm-up (the best, not the mean: on a shared machine the slow bursts measure the
    neighbours)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    flops = 2 * size**3
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device != "cpu":
            torch.cuda.synchronize()
        start, reps = time.perf_counter(), 4
        for _ in range(reps):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, reps * flops / (time.perf_counter() - start) / 1e9)
    return best


def machine_line() -> str:
    """CPU model, cores, torch threads, bf16 capability (the flags found) and GPU."""
    flags = sorted(cpu_flags() & CPU_BF16_FLAGS)
    bf16 = f"yes ({', '.join(flags)})" if cpu_has_bf16() else "no (fp32 is hdee's CPU choice)"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"machine: CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads; CPU bf16 units: {bf16}; GPU: {gpu}"
    )


def print_machine(peaks: bool = False) -> dict[str, float]:
    """Print `machine_line()` and, with `peaks`, the measured CPU matmul peak in fp32 and bf16
    (returned as {"fp32": GFLOP/s, "bf16": GFLOP/s}; empty without `peaks`)."""
    print(machine_line(), flush=True)
    if not peaks:
        return {}
    measured = {
        "fp32": matmul_peak_gflops(torch.float32),
        "bf16": matmul_peak_gflops(torch.bfloat16),
    }
    print(
        f"measured CPU matmul peak (1024^2, best burst): fp32 {measured['fp32']:.0f} GFLOP/s, "
        f"bf16 {measured['bf16']:.0f} GFLOP/s ({measured['bf16'] / measured['fp32']:.2f}x)",
        flush=True,
    )
    return measured
