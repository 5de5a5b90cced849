"""Kill `hdee discover` for real (SIGKILL: no cleanup) after it has fitted its clusters, while
it assigns and tokenizes the corpus; the same command then resumes from the stored transform
and gives the identical assignment and token files as a discovery never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from fault_helpers import hdee

from conftest import discovery_run_config
from hdee.layout import RunLayout


def test_sigkill_during_discovery_then_resume_gives_the_identical_assignment(
    tmp_path: Path,
) -> None:
    raw = discovery_run_config(tmp_path, sizes=(200, 200, 200, 200))
    raw["data"]["discover"]["sample_documents"] = 200  # a sample, not the whole corpus
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(raw))
    layout = RunLayout.of(raw["run_dir"])
    command = [sys.executable, "-m", "hdee.cli", "discover", str(config), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not layout.discovery_transform.exists() and process.poll() is None:
        assert time.monotonic() < deadline, "discovery did not finish its fit in 180 s"
        time.sleep(0.002)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not layout.discovery_record.exists(), "the kill came after discovery had finished"

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "reusing the fitted transform" in resumed.stderr
    assert not list(layout.data.glob("cluster-*/.*.tmp")), "a killed write was left behind"

    reference = dict(raw, run_dir=str(tmp_path / "reference"))
    (tmp_path / "reference.yaml").write_text(yaml.safe_dump(reference))
    code, _, err = hdee("discover", str(tmp_path / "reference.yaml"), "--quiet")
    assert code == 0, err
    expected = RunLayout.of(tmp_path / "reference")
    assert layout.discovery_assignment.read_bytes() == expected.discovery_assignment.read_bytes()
    clusters = json.loads(layout.discovery_record.read_text())["clusters"]
    assert clusters == json.loads(expected.discovery_record.read_text())["clusters"]
    for name in clusters:
        for split in ("train", "validation", "test"):
            assert (
                layout.tokens(name, split).read_bytes() == expected.tokens(name, split).read_bytes()
            )
