"""Run-directory housekeeping every command that writes a run needs: the lock that keeps two
hdee processes out of one directory, and the resolved config saved beside the results.

Kept apart from pipeline.py so that `hdee prepare` does not import torch and transformers'
model code (seconds of start-up) just to take the lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

import yaml

from hdee.atomic import write_text
from hdee.config import ExperimentConfig
from hdee.layout import RunLayout

# The first line of every run's config.yaml: what marks a directory as an earlier run
# (hdee.outputs), so `hdee run` never writes into a directory it did not make.
RESOLVED_CONFIG_HEADER = "# The resolved config of this run (written by hdee).\n"


class RunError(RuntimeError):
    """A run cannot go on (locked, a stage's inputs missing); the message says what to do."""


@contextmanager
def run_lock(layout: RunLayout, command: str = "hdee run") -> Iterator[None]:
    """Stop two hdee commands from writing one run directory at once (`hdee run`, `prepare`,
    `jobs`, `evaluate`, `report`, `tasks`, `export` into the run): the second is refused with
    the first one's name and pid. The lock dies with the process."""
    layout.run_root.mkdir(parents=True, exist_ok=True)
    handle = open(layout.lock, "a+")  # noqa: SIM115 - held for the whole block
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunError(
            f"{layout.run_root} is in use by {holder} (lock {layout.lock}); wait for it to finish"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{command}, pid {os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def save_resolved_config(config: ExperimentConfig, layout: RunLayout) -> None:
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    write_text(layout.config, RESOLVED_CONFIG_HEADER + text)
