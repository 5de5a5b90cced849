"""Numbers for people: SI prefixes and durations. Shared by the console, `hdee plan` and the
report, so a budget reads the same everywhere."""

from __future__ import annotations


def si(value: float) -> str:
    """A count with an SI prefix, e.g. 429P (FLOPs) or 11.1M (|FFN| x steps)."""
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def duration(seconds: float) -> str:
    """A duration as a clock reads it: 42s, 3m07s, 2h05m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
