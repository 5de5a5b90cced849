"""`hdee migrate RUN`: every record of a run directory rewritten in the version this hdee writes.

A record whose shape changed keeps being read in its older versions (`Record.ALSO_READS`), so
an old run works without migrating; migrating rewrites those files in the current shape, so
that the run reads as one written today (by tools outside hdee too) and a later hdee that
drops the old version still reads it. Each file is rewritten atomically (temp file + rename,
`hdee.atomic`), and only after every record of the run has been read: a record this hdee
cannot read stops the migration before anything is written. Running it again changes nothing,
and a run with nothing to upgrade is not written at all (not even its lock).

Migrated: the typed records of `hdee.records` (plan, discovery, job results, difficulty,
evaluation results of every repeat, tasks results). Token manifests, checkpoints and exports
carry formats of their own and are not records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hdee.layout import RunLayout
from hdee.records import (
    DifficultyRecord,
    DiscoveryRecord,
    EvaluationResults,
    JobResult,
    Plan,
    Record,
    RecordError,
    TasksResults,
)


@dataclass(frozen=True)
class RecordFile:
    """One record file of a run: where it is, the class that reads it, its version."""

    path: Path
    kind: type[Record]
    version: int  # the version the file holds

    @property
    def format(self) -> str:
        return self.kind.expected()[0]

    @property
    def current(self) -> int:
        return self.kind.expected()[1]

    @property
    def outdated(self) -> bool:
        return self.version != self.current


def record_paths(layout: RunLayout) -> list[tuple[Path, type[Record]]]:
    """Every record file the run directory holds, with the class that reads it: the run's
    own records, each job's result and each repeat's plan, difficulty and evaluation."""
    run = RunLayout(layout.run_root)
    views = [run] + [run.repeat(k) for k in _repeat_indices(run)]
    candidates: list[tuple[Path, type[Record]]] = [(run.discovery_record, DiscoveryRecord)]
    if run.jobs.is_dir():
        jobs = sorted(path.name for path in run.jobs.iterdir() if path.is_dir())
        candidates += [(run.job(job_id).result, JobResult) for job_id in jobs]
    for view in views:
        candidates += [
            (view.plan, Plan),
            (view.difficulty_record, DifficultyRecord),
            (view.results, EvaluationResults),
        ]
    candidates.append((run.tasks_results, TasksResults))
    return [(path, kind) for path, kind in candidates if path.is_file()]


def _repeat_indices(run: RunLayout) -> list[int]:
    if not run.repeats.is_dir():
        return []
    return sorted(int(path.name) for path in run.repeats.iterdir() if path.name.isdigit())


def survey(layout: RunLayout) -> list[RecordFile]:
    """Read every record of the run (as every command reads it). A file this hdee cannot read
    (corrupt, foreign, or of a version it does not read) is a RecordError naming it."""
    found = []
    for path, kind in record_paths(layout):
        current = kind.expected()[1]
        version = _file_version(path)
        if isinstance(version, int) and version > current:
            raise RecordError(
                f"{path}: {kind.expected()[0]} version {version} was written by a newer hdee "
                f"(this one writes version {current}); use that hdee on this run"
            )
        record = kind.read(path)  # refuses what this hdee cannot read, naming the file
        found.append(RecordFile(path, kind, record.model_dump(include={"version"})["version"]))
    return found


def _file_version(path: Path) -> object:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # Record.read names the problem
    return data.get("version") if isinstance(data, dict) else None


def upgrade(record_file: RecordFile) -> None:
    """Rewrite one record in the current version: read in its old version, written whole
    in the current one (atomically, by `Record.write`)."""
    record = record_file.kind.read(record_file.path)
    record.model_copy(update={"version": record_file.current}).write(record_file.path)


def migrate_run(layout: RunLayout, dry_run: bool = False) -> list[RecordFile]:
    """Upgrade every outdated record of the run (none with `dry_run`); returns what the run
    held before. Every record is read before the first is written."""
    from hdee.rundir import run_lock

    found = survey(layout)
    if dry_run or not any(item.outdated for item in found):
        return found
    with run_lock(layout, "hdee migrate"):
        found = survey(layout)  # again under the lock: another command may have written
        for item in found:
            if item.outdated:
                upgrade(item)
    return found
