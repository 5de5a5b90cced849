"""Weights integrity: every number hdee reports is computed from a finished model's
`model.safetensors`, so a file changed after training (a flipped byte, a truncation, a copy
from another run) must never turn into a number silently.

Each finished job records the sha256 of its weights in result.json (`JobResult.weights_sha256`).
Every reader of a job's `final/` (scoring.load_expert: evaluate, difficulty, generate; an
expert branching from its parent; export, tasks) calls `verify_model_dir` first. Hashing reads
the whole file once per process (about 1-2 s per GB); later calls for an unchanged file (same
size, mtime and inode) reuse the digest.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hdee.layout import JobLayout
from hdee.records import JobResult

WEIGHTS_FILE = "model.safetensors"  # hdee.model.WEIGHTS_NAME, without importing transformers
_CHUNK = 8 << 20

# resolved path -> ((size, mtime_ns, inode), sha256) of files hashed in this process
_digests: dict[Path, tuple[tuple[int, int, int], str]] = {}


class IntegrityError(ValueError):
    """A model's weights differ from what its job recorded when it finished."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read once per process while it stays unchanged."""
    path = Path(path).resolve()
    stat = os.stat(path)
    signature = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    known = _digests.get(path)
    if known is not None and known[0] == signature:
        return known[1]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    _digests[path] = (signature, digest.hexdigest())
    return digest.hexdigest()


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 of a model directory's weights file (what result.json records)."""
    return file_sha256(Path(model_dir) / WEIGHTS_FILE)


def job_of(model_dir: str | Path) -> JobLayout | None:
    """The job whose `final/` this directory is, or None for any other model directory."""
    model_dir = Path(model_dir)
    job = JobLayout(model_dir.parent)
    return job if job.final == model_dir and job.is_done() else None


def verify_model_dir(model_dir: str | Path) -> str | None:
    """Check a finished job's `final/` weights against the sha256 in its result.json and return
    it; IntegrityError naming the file when they differ. None for a directory that is not a
    finished job's model (an export, a hub model): nothing recorded to compare with."""
    job = job_of(model_dir)
    if job is None:
        return None
    return verify_job(job)


def verify_job(job: JobLayout) -> str:
    """The verified weights sha256 of a finished job (see `verify_model_dir`)."""
    recorded = JobResult.read(job.result).weights_sha256
    weights = job.final / WEIGHTS_FILE
    if not weights.is_file():
        raise IntegrityError(
            f"{weights}: missing, though {job.result} says the job finished; delete "
            f"{job.root} and run the job again"
        )
    actual = file_sha256(weights)
    if actual != recorded:
        raise IntegrityError(
            f"{weights}: sha256 {actual[:16]}... differs from {recorded[:16]}... recorded in "
            f"{job.result} when the job finished (size now {weights.stat().st_size:,} bytes): "
            f"the weights changed after training. Restore them or delete {job.root} and run "
            "the job again"
        )
    return actual


def checked_weights_sha256(model_dir: str | Path) -> str:
    """The sha256 of a model directory's weights, verified against its job's record where
    there is one (`verify_model_dir`); what caches of a model's outputs are keyed by."""
    verified = verify_model_dir(model_dir)
    if verified is not None:
        return verified
    weights = Path(model_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no trained model here (has its job finished?)")
    return file_sha256(weights)
