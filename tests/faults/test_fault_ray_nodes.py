"""Ray on two nodes (docs/scaling.md): a Ray head and a second Ray node on this machine, `hdee
run --runner ray --address ...`, the second node killed (its job's worker and raylet) while a
seed trains on it. Ray retries the lost job, it resumes, and the run ends with models and
results byte-identical to the uninterrupted shared run (conftest.tiny_cli_run). Skipped where
`ray` is not installed.

Ray 2.60 refuses a second node without the cluster's token, so the head, the node and the
driver share RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN. Teardown kills the two
`ray start --block` processes this test started and everything below them, by id (never
`ray stop --force`, which would stop every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from hdee.layout import RunLayout
from hdee.records import Plan

pytest.importorskip("ray", reason="needs ray: pip install 'hdee[ray]'")
pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
READY = "block forever"  # what `ray start --block` logs once the node has joined


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            [RAY, "start", *args, "--block", "--disable-usage-stats"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: raylet, GCS and workers inside
        )


def _wait_ready(process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while READY not in log.read_text(errors="replace"):
        assert process.poll() is None, log.read_text(errors="replace")[-2000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.2)


def _descendants(root: int) -> dict[int, str]:
    """pid -> process name of every process below `root` (Ray starts workers in sessions of
    their own, so the process group is not enough)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
            names[int(stat.parent.name)] = text.split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, ValueError, IndexError):
            continue
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = names[pid]
                frontier.append(pid)
    return found


def _training_on(node: subprocess.Popen, layout: RunLayout) -> bool:
    """Whether a job runs on this node's Ray worker and has begun training (its log says)."""
    for pid in _descendants(node.pid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith("ray::seed-") or title.startswith("ray::expert-"):
            log = layout.job(title.removeprefix("ray::").split()[0]).log
            if log.is_file() and "[hdee.train] " in log.read_text(errors="replace"):
                return True
    return False


def _outputs(layout: RunLayout) -> dict[str, bytes]:
    files = [layout.plan, layout.difficulty_record, layout.results]
    files += [layout.job(j).final / "model.safetensors" for j in Plan.read(layout.plan).jobs]
    return {str(path.relative_to(layout.root)): path.read_bytes() for path in files}


def test_a_lost_ray_node_is_retried_and_the_run_ends_the_same(
    tiny_cli_run: dict, tmp_path: Path
) -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "OMP_NUM_THREADS": "1",  # the arithmetic of the shared run
    }
    # Ray's socket paths must stay under 107 characters: a short private temp dir.
    ray_dir = Path(tempfile.mkdtemp(prefix="hdee-ray-", dir="/tmp"))
    head = node = None
    try:
        head = _start(
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--num-cpus=1",
                "--include-dashboard=false",
                f"--temp-dir={ray_dir}",
            ],
            tmp_path / "head.log",
            env,
        )
        _wait_ready(head, tmp_path / "head.log")
        node = _start(
            [f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1"],
            tmp_path / "node.log",
            env,
        )
        _wait_ready(node, tmp_path / "node.log")

        raw = yaml.safe_load(tiny_cli_run["config_path"].read_text())
        raw["run_dir"] = str(tmp_path / "run")
        raw["runner"] = {"kind": "ray", "address": address, "cpus_per_job": 1}
        config = tmp_path / "experiment.yaml"
        config.write_text(yaml.safe_dump(raw))
        layout = RunLayout.of(tmp_path / "run")
        run = subprocess.Popen(
            [sys.executable, "-m", "hdee.cli", "run", str(config), "--quiet"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # Two seeds train at once, one per node: kill the second node's raylet once the job
        # on it has started training (its Ray worker is titled `ray::<job id>`).
        deadline = time.monotonic() + 300
        while not _training_on(node, layout):
            assert run.poll() is None, run.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no job trained on the second node in 300 s"
            time.sleep(0.01)
        # The node dies: its training worker first (so a tiny job cannot finish and report
        # in the moment before its node is declared dead), then the raylet and the rest.
        on_node = _descendants(node.pid)
        assert "raylet" in on_node.values(), on_node
        for pid in sorted(on_node, key=lambda pid: on_node[pid] == "raylet"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err.decode()[-3000:]

        starts = sum(
            log.read_text().count("[hdee.train] ") for log in layout.jobs.glob("*/train.log")
        )
        assert starts > len(Plan.read(layout.plan).jobs), "no job was retried"
        expected = _outputs(RunLayout.of(tiny_cli_run["run_dir"]))
        got = _outputs(layout)
        assert [name for name in expected if got.get(name) != expected[name]] == []
    finally:
        for process in (node, head):  # what this test started, by process id
            if process is None:
                continue
            for pid in [*_descendants(process.pid), process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)
