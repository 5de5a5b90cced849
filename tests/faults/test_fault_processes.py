"""No process outlives a killed hdee: SIGKILL of `hdee run` while `prepare` tokenizes with its
worker pool takes the workers and multiprocessing's resource tracker with it
(hdee.processes.die_with_parent). The training runner's pool: tests/test_pipeline.py (SIGTERM)
and tests/test_runner_local.py."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import WORDS, tiny_run_config
from hdee.data.packing import POOL_MIN_CHARS
from hdee.layout import RunLayout

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="reads /proc and uses prctl (Linux)"
)


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of the processes whose parent is `pid`."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                found[int(stat.parent.name)] = cmdline.decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkill_during_prepare_leaves_no_tokenizer_worker(
    tiny_cli_run: dict, tmp_path: Path
) -> None:
    raw = tiny_run_config(tmp_path)
    # Enough local text that prepare starts its worker pool at once, and a ready tokenizer so
    # it starts tokenizing within seconds (no BPE training first).
    big = tmp_path / "big"
    big.mkdir()
    rng = random.Random(0)
    paragraph = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(80)) for _ in range(200))
    with open(big / "big.txt", "w", encoding="utf-8") as handle:
        for _ in range(POOL_MIN_CHARS * 11 // 10 // len(paragraph) + 1):
            handle.write(paragraph + "\n\n")
    raw["data"]["general"]["source"]["paths"].append(str(big))
    raw["data"]["num_workers"] = 2
    tokenizer = RunLayout.of(tiny_cli_run["run_dir"]).tokenizer
    raw["data"]["tokenizer"] = {"kind": "pretrained", "name_or_path": str(tokenizer)}
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(raw))

    command = [sys.executable, "-m", "hdee.cli", "run", str(config), "--until", "prepare"]
    process = subprocess.Popen(
        [*command, "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    children: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while not any("spawn_main" in line for line in children.values()):
            assert process.poll() is None, "prepare ended before its worker pool started"
            assert time.monotonic() < deadline, "no tokenizer worker within 120 s"
            time.sleep(0.02)
            children = _children(process.pid)
        assert any("resource_tracker" in line for line in children.values()), children
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in children):
            assert time.monotonic() < deadline, f"outlived the killed run: {children}"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
        for pid in children:  # the processes this test started, should the check fail
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
