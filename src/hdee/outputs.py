"""Paths a user names for hdee to write: hdee never deletes what it did not write.

Every command that writes where the user points it (export's OUT, generate's --weights-jsonl,
a run directory, the demo's --run-dir) asks this module first. A target that does not exist
or is empty is written. A target that is an earlier output of the same command is replaced,
but only the files that output held: what the user added beside them stays. Anything else is
refused (exit 2, naming the path and the flag) unless the user gives --overwrite, and even
then hdee only adds its files beside what is there: a name already taken by something hdee
did not write is refused, never replaced.

An earlier output is recognised by what the command wrote: a directory output by its marker
file (`.hdee-output.json`: the command and the files it wrote), a run directory by the
resolved config hdee writes (`config.yaml` opening with hdee's header line), a weights file by
its JSON lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hdee.atomic import follow_umask, fsync_dir, named_os_error, read_json, write_json
from hdee.config import UsageError
from hdee.layout import RunLayout
from hdee.rundir import RESOLVED_CONFIG_HEADER

MARKER = ".hdee-output.json"
MARKER_FORMAT = "hdee-output"
_LOCK_TEXT = re.compile(r"(hdee [a-z]+, pid \d+\n?)?")  # what rundir.run_lock writes


class OutputError(UsageError):
    """hdee was asked to write where it could delete something it did not write."""


def _absolute(target: str | Path, follow_links: bool = True) -> Path:
    # `.`, `..` and `out/` get a real name and a real parent to stage beside; a link to a
    # directory is written through (what it points at), a link as a file is refused.
    target = Path(target).expanduser()
    target = target.resolve() if follow_links else Path(os.path.abspath(target))
    if target.parent == target:
        raise OutputError(f"{target}: hdee does not write into a filesystem root")
    return target


# ----------------------------------------------------------------------------------------------
# A directory output (hdee export OUT)


def _earlier_files(target: Path, command: str) -> list[str] | None:
    """The files an earlier output of `command` wrote into `target` (its marker's list), or
    None when `target` holds no marker of that command."""
    marker = target / MARKER
    if not marker.is_file():
        return None
    try:
        record = read_json(marker)
    except (ValueError, OSError):
        return None
    if not isinstance(record, dict) or record.get("format") != MARKER_FORMAT:
        return None
    files = record.get("files")
    if record.get("command") != command or not isinstance(files, list):
        return None
    return [f for f in files if isinstance(f, str) and _is_relative_name(f)]


def _is_relative_name(name: str) -> bool:
    path = Path(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts


def _only_earlier_files(target: Path, earlier: list[str]) -> bool:
    """Whether `target` holds nothing but the marker and the files `earlier` lists (and the
    directories they sit in). Reads only those directories, never a whole home directory."""
    allowed = {MARKER, *earlier}
    directories = {str(parent) for name in earlier for parent in Path(name).parents} - {"."}
    pending = [Path(".")]
    while pending:
        relative = pending.pop()
        for entry in os.scandir(target / relative):
            name = str(relative / entry.name)
            if name in directories and entry.is_dir(follow_symlinks=False):
                pending.append(Path(name))
            elif name not in allowed:
                return False
    return True


def check_output_directory(target: str | Path, command: str, flag: str, overwrite: bool) -> None:
    """Refuse, before any work, a target `command` may not write (OutputError, exit 2)."""
    target = _absolute(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise OutputError(
            f"{flag} {target}: exists and is not a directory; hdee never replaces a file it "
            "did not write: choose another path"
        )
    if overwrite or not any(target.iterdir()) or _earlier_files(target, command) is not None:
        return
    raise OutputError(
        f"{flag} {target}: not empty and not an earlier output of `{command}` (no {MARKER} of "
        f"it there); choose a new or empty directory, or give --overwrite to write beside what "
        "is there (nothing in it is removed or replaced)"
    )


def _files_under(root: Path) -> list[str]:
    return sorted(
        str(Path(parent, name).relative_to(root))
        for parent, _, files in os.walk(root)
        for name in files
    )


def _taken(target: Path, new: list[str], earlier: list[str]) -> list[str]:
    """The names `new` would replace that no earlier output of this command wrote."""
    ours = set(earlier)
    taken = []
    for name in new:
        path = target / name
        if name not in ours and (path.exists() or path.is_symlink()):
            taken.append(name)
        for parent in Path(name).parents:
            above = target / parent
            if str(parent) != "." and (above.is_symlink() or above.is_file()):
                taken.append(str(parent))
    return sorted(set(taken))


@contextmanager
def output_directory(
    target: str | Path, command: str, flag: str, overwrite: bool = False
) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; when the block succeeds its files
    become `target`'s (with the marker), replacing only what an earlier output of `command`
    wrote there. A new, empty, or purely earlier target is swapped in whole (a reader sees the
    old output or the new one, never a mix); one that also holds the user's files gets the new
    files moved in beside them, the marker naming old and new first so a crash leaves nothing
    the next run cannot recognise."""
    target = _absolute(target)
    check_output_directory(target, command, flag, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as error:
        raise named_os_error(error, target) from error
    try:
        yield tmp
        check_output_directory(target, command, flag, overwrite)  # it may have changed since
        new = _files_under(tmp)
        earlier = (_earlier_files(target, command) or []) if target.is_dir() else []
        taken = _taken(target, new, earlier)
        if taken:
            raise OutputError(
                f"{flag} {target}: {', '.join(taken)} already there and not written by "
                f"`{command}`; hdee never replaces what it did not write: move "
                f"{'it' if len(taken) == 1 else 'them'} away or choose another {flag}"
            )
        _marker(tmp, command, new)
        follow_umask(tmp)
        empty = target.is_dir() and not any(target.iterdir())
        if not target.exists() or empty:
            os.replace(tmp, target)  # rename(2) replaces an empty directory
        elif _only_earlier_files(target, earlier):
            _swap(tmp, target)
        else:
            _merge(tmp, target, command, new, earlier)
        fsync_dir(target.parent)
    except OSError as error:
        raise named_os_error(error, target) from error
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _marker(directory: Path, command: str, files: list[str]) -> None:
    write_json(
        directory / MARKER,
        {"format": MARKER_FORMAT, "version": 1, "command": command, "files": files},
    )


def _swap(tmp: Path, target: Path) -> None:
    # Two renames, never a partial tree; what is moved aside is only the earlier output.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _merge(tmp: Path, target: Path, command: str, new: list[str], earlier: list[str]) -> None:
    _marker(target, command, sorted({*earlier, *new}))  # every name claimed before any moves
    for name in sorted(set(earlier) - set(new)):
        (target / name).unlink(missing_ok=True)
        for parent in Path(name).parents:
            if str(parent) == "." or any((target / parent).iterdir()):
                break
            (target / parent).rmdir()
    for name in new:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, target / name)
    os.replace(tmp / MARKER, target / MARKER)


# ----------------------------------------------------------------------------------------------
# A file output (hdee generate --weights-jsonl PATH)


def check_output_file(
    target: str | Path, command: str, flag: str, earlier: Callable[[Path], bool]
) -> None:
    """Refuse a file `command` may not replace: an existing non-empty file for which `earlier`
    (does it hold what `command` writes?) is False. There is no --overwrite for one file:
    replacing it would delete what hdee did not write."""
    target = _absolute(target, follow_links=False)
    if target.is_symlink() or (target.exists() and not target.is_file()):
        kind = "a symbolic link" if target.is_symlink() else "not a regular file"
        raise OutputError(f"{flag} {target}: {kind}; choose a new file")
    if target.is_file() and target.stat().st_size > 0 and not earlier(target):
        raise OutputError(
            f"{flag} {target}: exists and was not written by `{command}`; hdee never replaces "
            "a file it did not write: remove it or choose a new file"
        )


WEIGHTS_JSONL_KEYS = frozenset({"step", "token_id", "token", "log_prob", "weights"})


def is_weights_jsonl(path: Path) -> bool:
    """Whether every line of `path` is a record `hdee.generate.weights_jsonl` writes: an optional
    first line `{"ensemble": {...}}` (the spec that generated), then one record per token."""
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                record = json.loads(line)
                if not isinstance(record, dict):
                    return False
                is_header = number == 0 and set(record) == {"ensemble"}
                if not is_header and set(record) != WEIGHTS_JSONL_KEYS:
                    return False
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# A run directory (run_dir of hdee prepare / jobs / run, the demo's --run-dir)


def _is_earlier_run(root: Path, headers: dict[str, str]) -> bool:
    for name, header in headers.items():
        try:
            with open(root / name, encoding="utf-8") as handle:
                if handle.readline() == header.splitlines(keepends=True)[0]:
                    return True
        except (OSError, UnicodeDecodeError, IndexError):
            continue
    return False


def _is_hdee_lock(path: Path) -> bool:
    """Whether `path` is a run lock hdee left (a command stopped before it saved the config,
    or one that failed in a directory given with --overwrite)."""
    try:
        return path.is_file() and _LOCK_TEXT.fullmatch(path.read_text(encoding="utf-8")) is not None
    except (OSError, UnicodeDecodeError):
        return False


def check_run_directory(
    layout: RunLayout,
    flag: str,
    overwrite: bool,
    extra: dict[str, str | None] | None = None,
) -> None:
    """Refuse a run directory (OutputError, exit 2) that holds something and is not an earlier
    run: with --overwrite, one where a name hdee writes at its top is already taken.

    `extra` adds the top-level names another writer (the demo) puts there, each with the header
    line its file opens with (None for a directory) when that file marks an earlier output."""
    root = layout.run_root.expanduser().resolve()
    layout = RunLayout.of(root)
    if not root.exists() and not root.is_symlink():
        return
    if not root.is_dir():
        raise OutputError(f"{flag} {root}: exists and is not a directory; choose another")
    headers = {layout.config.name: RESOLVED_CONFIG_HEADER}
    headers.update({name: header for name, header in (extra or {}).items() if header})
    entries = [entry.name for entry in root.iterdir()]
    if entries in ([], [layout.lock.name]) and (not entries or _is_hdee_lock(layout.lock)):
        return
    if _is_earlier_run(root, headers):
        return
    if not overwrite:
        raise OutputError(
            f"{flag} {root}: not empty and not an hdee run directory (no {layout.config.name} "
            "written by hdee); choose a new or empty directory, or give --overwrite to put the "
            "run beside what is there (nothing in it is removed or replaced)"
        )
    names = [path.name for path in layout.top_level()] + list(extra or {})
    taken = sorted(
        name
        for name in names
        if ((root / name).exists() or (root / name).is_symlink())
        and not (name == layout.lock.name and _is_hdee_lock(layout.lock))
    )
    if taken:
        raise OutputError(
            f"{flag} {root}: {', '.join(taken)} already there and not written by hdee; "
            "--overwrite never replaces what hdee did not write: move "
            f"{'it' if len(taken) == 1 else 'them'} away or choose another directory"
        )
