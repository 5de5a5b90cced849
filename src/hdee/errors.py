"""The error a bad command-line argument raises: `hdee` exits 2 for it, as for a bad config,
where a runtime failure exits 1 (docs/cli.md). Its own module so that the records, the configs
and the ensemble spec can all raise it without importing each other."""

from __future__ import annotations


class UsageError(ValueError):
    """A command-line argument is wrong (out of its range, naming nothing that exists, a path
    hdee may not write). The message names the flag and what it allows."""
