"""A training job's metrics: one JSON row per logged step in metrics.jsonl, mirrored to
TensorBoard. A context manager, so a job that fails still closes both files."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from hdee.atomic import write_text
from hdee.layout import JobLayout


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line cut by a crash mid-write is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trim_metrics(path: Path, step: int) -> None:
    """Drop rows after `step` (written after the checkpoint we resume from) and any
    half-written last line, so the resumed log reads like an uninterrupted one."""
    if not path.exists():
        return
    kept = [row for row in read_metrics(path) if int(row.get("step", 0)) <= step]
    write_text(path, "".join(json.dumps(row) + "\n" for row in kept))


class MetricsLogger:
    """Appends rows to metrics.jsonl and TensorBoard, resuming after `start_step`. Disabled
    (writes nothing) on every DDP rank but 0."""

    def __init__(self, job: JobLayout, start_step: int, enabled: bool = True) -> None:
        self.job = job
        self.start_step = start_step
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._writer: Any = None

    def __enter__(self) -> MetricsLogger:
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            trim_metrics(self.job.metrics, self.start_step)
            self._file = open(self.job.metrics, "a", encoding="utf-8")  # noqa: SIM115
            # purge_step drops TensorBoard events after the checkpoint we resume from.
            self._writer = SummaryWriter(str(self.job.tensorboard), purge_step=self.start_step + 1)
        return self

    def log(self, row: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, row["step"])

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self._file.close()
            self._writer.close()
            self._file = self._writer = None
