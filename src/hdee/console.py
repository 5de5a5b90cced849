"""Everything hdee shows a person while it works: progress bars, status lines, tables.

One switch decides how progress is shown, the environment variable `HDEE_PROGRESS`:

    auto   (default) a live bar when stderr is a terminal, plain periodic lines otherwise
    1      a live bar even when stderr is not a terminal (a log viewer that renders ANSI)
    plain  plain periodic lines even on a terminal
    0      no progress at all

A command's `--quiet` flag is `HDEE_PROGRESS=0` for that command (`enabled=False` below).
`HDEE_NO_PROGRESS` (any value) is read as `HDEE_PROGRESS=0`, for old scripts. A job writing
into its `train.log` (`job_log`) always writes plain lines there: the log is the record, the
switch only governs what this terminal shows. Status lines, tables and errors are printed
whatever the switch says.

Progress goes to stderr; tables that are a command's result go to whichever console the caller
passes (`hdee plan` and `hdee prepare`: stdout). Off a terminal, nothing is wrapped, cut or
elided: tables become plain aligned rows and long lines stay one line, so identifiers survive
`| grep` and log files intact.

A training loop:

    with progress(f"seed {job}", total=steps, completed=start_step, unit="steps",
                  enabled=show) as bar:
        for step in range(start_step, steps):
            ...
            bar.update(step + 1, loss=f"{loss:.4f}", tok_per_s=f"{tokens_per_s:,.0f}")

shows `seed ...  ━━━━━  120/400 steps  loss 3.2100  tok/s 12,345  0:00:41  ETA 1m35s`, or
every 5 % (and at least every `interval` seconds) a line
`seed ...: 120/400 steps (30%)  loss 3.2100  tok/s 12,345  41s elapsed, ETA 1m35s`.
A field's name is shown with `_per_` written as `/`; values are shown as given.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from hdee.formatting import duration

PROGRESS_ENV = "HDEE_PROGRESS"
DEPRECATED_PROGRESS_ENV = "HDEE_NO_PROGRESS"
PROGRESS_SETTINGS = ("auto", "1", "plain", "0")

Mode = Literal["bar", "plain", "off"]

# Set while a job writes into its train.log: progress there is always plain lines.
_forced_mode: ContextVar[Mode | None] = ContextVar("hdee_forced_progress_mode", default=None)
# The live display in use: rich allows one at a time, so a bar opened inside another one (a job
# inside the runner's "jobs" bar) becomes a second line of the same display.
_live: Progress | None = None


# ----------------------------------------------------------------------------------------------
# The switch


def progress_setting() -> str:
    """`HDEE_PROGRESS` as set (or its deprecated alias), checked."""
    value = os.environ.get(PROGRESS_ENV)
    if value is None:
        return "0" if os.environ.get(DEPRECATED_PROGRESS_ENV) is not None else "auto"
    value = value.strip().lower()
    if value not in PROGRESS_SETTINGS:
        raise ValueError(
            f"{PROGRESS_ENV}={os.environ[PROGRESS_ENV]!r}: expected one of "
            f"{', '.join(PROGRESS_SETTINGS)} (see `hdee --help`)"
        )
    return value


def progress_mode(enabled: bool = True) -> Mode:
    """How a progress bar opened now shows itself: 'bar' (live), 'plain' (lines) or 'off'.
    `enabled=False` is a command's --quiet."""
    if not enabled:
        return "off"
    forced = _forced_mode.get()
    if forced is not None:
        return forced
    setting = progress_setting()
    if setting == "0":
        return "off"
    if setting == "plain":
        return "plain"
    if setting == "1":
        return "bar"
    return "bar" if stderr_console().is_terminal else "plain"


@contextlib.contextmanager
def job_log(path: str | Path) -> Iterator[IO[str]]:
    """Send everything printed (stdout and stderr) to the log file at `path`, appending, with
    progress as plain lines: concurrent jobs never interleave on the terminal and a finished
    job's log stays beside its checkpoints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = _forced_mode.set("plain")
    try:
        with open(path, "a", encoding="utf-8") as log:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                yield log
    finally:
        _forced_mode.reset(token)


# ----------------------------------------------------------------------------------------------
# Consoles and lines

# No `file=`: rich then writes to whatever sys.stdout / sys.stderr is at the time of each
# write, so redirection (job_log, pytest's capture) reaches these consoles too.
_stdout = Console(highlight=False)
_stderr = Console(stderr=True, highlight=False)


def stdout_console() -> Console:
    """Where a command's result goes (tables of `hdee plan`, `hdee prepare`)."""
    return _stdout


def stderr_console() -> Console:
    """Where status and progress go."""
    return _stderr


def _target(console: Console | None) -> Console:
    # While a live bar shows, a line for its stream must go through the bar's own console, or
    # it would be written across the bar.
    if _live is not None and (console is None or console.file is _live.console.file):
        return _live.console
    return console or _stderr


def status(message: str, console: Console | None = None) -> None:
    """One status line (rich markup allowed, e.g. "[bold]seeds[/]: ..."), never wrapped or cut;
    printed above a live bar when one is showing."""
    _target(console).print(message, soft_wrap=True)


def warn(message: str, console: Console | None = None) -> None:
    """A warning a person should read, on stderr (or the console given)."""
    _target(console).print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


def section(title: str, console: Console | None = None) -> None:
    """A heading between stages: a rule on a terminal, `== title ==` in a log."""
    target = _target(console)
    if target.is_terminal:
        target.rule(Text(title, style="bold"))
    else:
        target.print(Text(f"== {title} =="), soft_wrap=True)


def print_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    title: str | None = None,
    right: Collection[str] = (),
    console: Console | None = None,
) -> None:
    """A table whose cells are never elided. On a terminal rich draws it and folds a cell that
    does not fit onto the next line; elsewhere (a pipe, a file) plain rows aligned with spaces,
    as wide as they need. Cells are text, not markup. `right`: columns aligned right."""
    target = _target(console)
    cells = [[str(cell) for cell in row] for row in rows]
    for row in cells:
        if len(row) != len(columns):
            raise ValueError(
                f"table {title!r}: a row has {len(row)} cells for {len(columns)} columns"
            )
    if target.is_terminal:
        table = Table(title=title)
        for name in columns:
            table.add_column(name, overflow="fold", justify="right" if name in right else "left")
        for row in cells:
            table.add_row(*(Text(cell) for cell in row))
        target.print(table)
        return
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = [
            value.rjust(width) if name in right else value.ljust(width)
            for name, value, width in zip(columns, values, widths, strict=True)
        ]
        return "  ".join(padded).rstrip()

    lines = ([title] if title else []) + [line(columns)] + [line(row) for row in cells]
    for text in lines:
        target.print(Text(text), soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# Progress


def _field_text(fields: dict[str, str]) -> str:
    return "  ".join(f"{name.replace('_per_', '/')} {value}" for name, value in fields.items())


class Bar:
    """One progress bar. `update` is cheap enough to call every step: a live bar redraws at its
    own rate and plain lines are written only every 5 % of the total or `interval` seconds."""

    def __init__(
        self,
        description: str,
        total: int | None,
        completed: int,
        unit: str,
        fields: dict[str, str],
        mode: Mode,
        interval: float,
    ) -> None:
        self.description = description
        self.total = total
        self.completed = completed
        self.unit = unit
        self.fields = fields
        self.mode = mode
        self.interval = interval
        self._started = time.monotonic()
        self._start_completed = completed
        self._printed_at = self._started
        self._printed_completed: int | None = None
        self._progress: Progress | None = None
        self._task: Any = None

    def update(
        self,
        completed: int | None = None,
        *,
        advance: int = 0,
        description: str | None = None,
        **fields: object,
    ) -> None:
        """Set (`completed`) or move on (`advance`) the count; change the description; set
        extra fields shown after the count (they stay until set again)."""
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if description is not None:
            self.description = description
        for name, value in fields.items():
            self.fields[name] = str(value)
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=self.completed,
                description=self.description,
                extra=_field_text(self.fields),
            )
        elif self.mode == "plain" and self._line_due():
            self._print_line()

    def _line_due(self) -> bool:
        if time.monotonic() - self._printed_at >= self.interval:
            return True
        if not self.total:
            return False
        last = self._start_completed if self._printed_completed is None else self._printed_completed
        return self.completed - last >= self.total / 20

    def line(self, final: bool = False) -> str:
        """The plain line for the current state (what `plain` mode prints)."""
        elapsed = time.monotonic() - self._started
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            count = f"{self.completed:,}/{self.total:,}{unit} ({self.completed / self.total:.0%})"
        else:
            count = f"{self.completed:,}{unit}"
        parts = [f"{self.description}: {count}"]
        if self.fields:
            parts.append(_field_text(self.fields))
        timing = f"{duration(elapsed)} elapsed"
        done = self.completed - self._start_completed
        if self.total and not final and self.completed < self.total and done > 0:
            eta = (self.total - self.completed) * elapsed / done
            timing += f", ETA {duration(eta)}"
        parts.append(timing)
        return "  ".join(parts)

    def _print_line(self, final: bool = False) -> None:
        _target(None).print(Text(self.line(final)), soft_wrap=True)
        self._printed_at = time.monotonic()
        self._printed_completed = self.completed


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        unit = f" {task.fields['unit']}" if task.fields.get("unit") else ""
        if task.total is None:
            return Text(f"{int(task.completed):,}{unit}")
        return Text(f"{int(task.completed):,}/{int(task.total):,}{unit}")


class _BarIfTotalColumn(BarColumn):
    def render(self, task: Task) -> Any:
        return super().render(task) if task.total is not None else Text("")


class _EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        remaining = task.time_remaining
        if task.total is None or task.finished or remaining is None:
            return Text("")
        return Text(f"ETA {duration(remaining)}", style="cyan")


def _live_display() -> Progress:
    force = True if progress_setting() == "1" else None
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False, style="bold"),
        _BarIfTotalColumn(),
        _CountColumn(),
        TextColumn("{task.fields[extra]}", markup=False),
        TimeElapsedColumn(),
        _EtaColumn(),
        console=Console(stderr=True, force_terminal=force, highlight=False),
    )


@contextlib.contextmanager
def progress(
    description: str,
    total: int | None = None,
    *,
    completed: int = 0,
    unit: str = "",
    enabled: bool = True,
    interval: float = 60.0,
    **fields: object,
) -> Iterator[Bar]:
    """A progress bar for a block of work: `total` units (None: unknown, count only), starting
    at `completed` (a resumed job), extra `fields` shown after the count. `enabled=False`
    (--quiet) shows nothing; otherwise HDEE_PROGRESS decides (module docstring). In plain mode
    a line is written every 5 % of the total, at least every `interval` seconds, and at the
    end."""
    global _live
    bar = Bar(
        description,
        total,
        completed,
        unit,
        {name: str(value) for name, value in fields.items()},
        progress_mode(enabled),
        interval,
    )
    owner = False
    if bar.mode == "bar":
        if _live is None:
            _live, owner = _live_display(), True
            _live.start()
        bar._progress = _live
        bar._task = _live.add_task(
            description, total=total, completed=completed, unit=unit, extra=_field_text(bar.fields)
        )
    try:
        yield bar
    finally:
        if bar._progress is not None:
            if owner:
                bar._progress.stop_task(bar._task)
                bar._progress.refresh()
                bar._progress.stop()
                _live = None
            else:
                bar._progress.remove_task(bar._task)  # the outer display keeps its own lines
        elif bar.mode == "plain" and bar._printed_completed != bar.completed:
            bar._print_line(final=True)
