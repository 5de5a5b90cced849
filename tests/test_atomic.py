"""Atomic writes: files and directories get the modes the umask asks for, and a failed write
(disk full, a file-size limit) names the file it was writing."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from hdee.atomic import atomic_directory, write_bytes, write_json
from hdee.data.tokens import TokenWriter


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    previous = os.umask(0o022)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    yield set_umask
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("mask", "file", "directory"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_written_files_and_directories_honour_the_umask(
    tmp_path: Path, umask, mask, file, directory
):
    umask(mask)
    write_bytes(tmp_path / "a.bin", b"x")
    write_json(tmp_path / "nested" / "b.json", {"a": 1})
    with atomic_directory(tmp_path / "model") as tmp:
        (tmp / "weights").write_bytes(b"w")
        write_json(tmp / "config.json", {})
    with TokenWriter(tmp_path / "tokens.bin", "uint16") as writer:
        writer.write(np.arange(4))
        writer.commit({})
    assert mode(tmp_path / "a.bin") == file
    assert mode(tmp_path / "nested" / "b.json") == file
    assert mode(tmp_path / "model") == directory
    assert mode(tmp_path / "model" / "config.json") == file
    assert mode(tmp_path / "tokens.bin") == file


# A child process with a file-size limit: writing past it fails with EFBIG ("File too
# large"), as a full disk fails with ENOSPC, and write() names no file in either case.
_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {hard}))
"""


def run_limited(code: str, limit: int = 65536) -> subprocess.CompletedProcess:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    prelude = _LIMITED.format(limit=limit, hard=hard)
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_a_failed_write_names_the_file(tmp_path: Path):
    target = tmp_path / "big.bin"
    result = run_limited(
        "from hdee.atomic import write_bytes\n"
        "try:\n"
        f"    write_bytes({str(target)!r}, b'x' * 200_000)\n"
        "except OSError as error:\n"
        "    print(error)\n"
    )
    assert f"[Errno 27] File too large: '{target}'" in result.stdout, result.stderr
    assert not target.exists() and not list(tmp_path.glob(".big.bin.*")), "a temporary file is left"


def test_a_failed_token_write_names_the_token_file(tmp_path: Path):
    target = tmp_path / "tokens.bin"
    result = run_limited(
        "import numpy as np\n"
        "from hdee.data.tokens import TokenWriter\n"
        f"writer = TokenWriter({str(target)!r}, 'uint16')\n"
        "try:\n"
        "    for _ in range(10):\n"
        "        writer.write(np.zeros(50_000, dtype='uint16'))\n"
        "    writer.commit({})\n"
        "except OSError as error:\n"
        "    print(error)\n"
    )
    assert f"File too large: '{target}'" in result.stdout, result.stderr


def test_the_cli_prints_the_path_of_a_failed_write(tmp_path: Path):
    import yaml

    from conftest import tiny_run_config

    raw = tiny_run_config(tmp_path)
    config_path = tmp_path / "experiment.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    result = run_limited(
        "from hdee.cli import main\n"
        f"sys.exit(main(['prepare', {str(config_path)!r}, '--quiet']))\n",
        limit=4096,  # the resolved config.yaml, the first file prepare writes, is larger
    )
    assert result.returncode == 1, result.stderr
    assert "hdee prepare: error: [Errno 27] File too large: " in result.stderr
    assert f"'{tmp_path / 'run' / 'config.yaml'}'" in result.stderr


# The tiny experiment (conftest's config cut to 4 domains, 1 iteration, 1 configuration), an
# export and a generation's weights, under each umask in turn, in one child process (a umask is
# the process's; one process pays the imports once).
_UNDER_UMASKS = """
import os, sys
import torch
torch.set_num_threads(1)
from hdee.cli import main
for mask, root in {roots!r}:
    os.umask(mask)
    run, out = os.path.join(root, "run"), os.path.join(root, "out")
    for argv in (
        ["run", os.path.join(root, "experiment.yaml"), "--quiet"],
        ["export", run, "--configuration", "MHo-IHo", os.path.join(out, "export")],
        ["generate", run, "--configuration", "MHo-IHo", "--prompt", "the a",
         "--max-new-tokens", "3", "--weights-jsonl", os.path.join(out, "weights.jsonl")],
    ):
        if main(argv) != 0:
            sys.exit(f"umask {{mask:03o}}: hdee {{argv[0]}} failed")
"""
MASKS = (0o022, 0o002, 0o077)


def test_every_file_of_a_run_and_an_export_follows_the_umask(tmp_path: Path):
    """A group sharing a run directory (umask 002) can read and write every file in it, a
    private one (077) shares none: model and trainer-state safetensors included, which
    safetensors itself writes 0600 whatever the umask."""
    import yaml

    from conftest import tiny_run_config

    roots = [(mask, tmp_path / f"{mask:03o}") for mask in MASKS]
    for _, root in roots:
        raw = tiny_run_config(root)
        raw["data"]["domains"] = raw["data"]["domains"][:4]
        raw["plan"]["held_out"] = ["d3"]
        raw["plan"]["iterations"] = 1
        raw["plan"]["configurations"] = raw["plan"]["configurations"][:1]
        raw["seeds"]["training"].update(steps=4, eval_every=2, checkpoint_every=2)
        (root / "experiment.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-c", _UNDER_UMASKS.format(roots=[(m, str(r)) for m, r in roots])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HDEE_PROGRESS": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for mask, root in roots:
        written = [root / "run", *sorted((root / "run").rglob("*")), *(root / "out").rglob("*")]
        names = {path.name for path in written}
        assert {"trainer_state.safetensors", "model.safetensors", "weights.jsonl"} <= names
        wrong = [
            f"{path.relative_to(root)}: {mode(path):o}"
            for path in written
            if mode(path) != (0o777 if path.is_dir() else 0o666) & ~mask
        ]
        assert wrong == [], f"umask {mask:03o}: {len(wrong)} of {len(written)} wrong: {wrong[:5]}"
