"""Helpers the fault tests share: the CLI in-process, and copies of the shared tiny run."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

from hdee.cli import main
from hdee.layout import RunLayout
from hdee.records import Plan


def hdee(*argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `hdee ARGV...`; argparse's exits count as statuses."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_info:
            code = int(exit_info.code or 0)
    return code, out.getvalue(), err.getvalue()


def copy_run(source: Path, destination: Path) -> RunLayout:
    """A private copy of a shared finished run (the shared one stays as it is)."""
    shutil.copytree(source, destination)
    return RunLayout.of(destination)


def an_expert(layout: RunLayout) -> str:
    """The job id of an expert of the run's baseline ensemble."""
    plan = Plan.read(layout.plan)
    _, ensemble = plan.ensemble(plan.baseline)
    return next(iter(ensemble.values()))
