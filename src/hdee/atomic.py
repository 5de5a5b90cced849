"""Atomic writes: a crash leaves either the old file or the new one, never half of either.

Everything hdee writes into a run directory goes through these helpers (or writes into a
temporary directory that is renamed into place as a whole).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only
    read it by setting it, which would race with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` would give a new file (0644 under umask 022). mkstemp and mkdtemp
    create 0600 / 0700 whatever the umask, which would lock other users (a shared group, a
    results server) out of a run directory."""
    return 0o666 & ~current_umask()


def directory_mode() -> int:
    return 0o777 & ~current_umask()


def follow_umask(tree: Path) -> None:
    """Give every file and directory under `tree` (itself included) the mode the umask asks
    for. Libraries that write through a temporary file of their own create it 0600 whatever
    the umask: safetensors >= 0.6 saves every model and trainer state that way, which locked a
    shared group out of every checkpoint in a run directory."""
    umask = current_umask()
    os.chmod(tree, 0o777 & ~umask)
    for parent, directories, files in os.walk(tree):
        for name in directories + files:
            path = os.path.join(parent, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                continue  # chmod would change what the link points at
            full = 0o777 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o666
            os.chmod(path, full & ~umask)


def named_os_error(error: OSError, path: str | Path) -> OSError:
    """`error` with `path` named when it names no file: a failed write() says only
    "[Errno 28] No space left on device", not which of a run's many files it was writing."""
    if error.filename is not None or error.errno is None:
        return error
    return OSError(error.errno, error.strerror, str(path))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` if the block succeeds."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise named_os_error(error, target) from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as error:
        raise named_os_error(error, target) from error
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read JSON written by hdee; a corrupt file raises ValueError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: corrupt JSON ({error})") from None


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `target` as a whole."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as error:
        raise named_os_error(error, target) from error
    try:
        yield tmp
        follow_umask(tmp)
        if target.exists():
            # Move the old one aside first so the swap is two renames, never a partial tree.
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as error:
        raise named_os_error(error, target) from error
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
