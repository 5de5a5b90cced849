"""Reaching the Hugging Face hub, or failing fast and clearly when it cannot be reached.

Without a network, transformers and datasets retry every request with back-off: `hdee plan` on
a hub tokenizer took about a minute to say "cannot connect". Here one short connection probe
decides first; when the hub is unreachable (or HF_HUB_OFFLINE is set) loaders read the local
cache only, which answers in a second, with the files if they were downloaded before.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_reason() -> str | None:
    """Why the hub cannot be used now (None when it can): offline mode asked for, or a failed
    connection to the endpoint. The probe runs once per process."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").upper() in _TRUE:
            return f"{name} is set"
    return _probe(hub_endpoint())


@functools.cache
def _probe(endpoint: str) -> str | None:
    parts = urlsplit(endpoint)
    host = parts.hostname or endpoint
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        return f"cannot connect to {endpoint}: {reason}"


def unreachable_message(what: str, reason: str) -> str:
    """What to say when `what` (e.g. "tokenizer 'meta-llama/Meta-Llama-3-8B'") needs the hub."""
    return (
        f"{what}: not in the local Hugging Face cache, and the hub cannot be reached "
        f"({reason}). Connect to the network (for gated models also `huggingface-cli login`), "
        "or download it elsewhere and give a local path"
    )


@contextmanager
def cache_only() -> Iterator[None]:
    """Make the datasets library read its cache only (no request, so no retries), for this
    block. It reads offline mode from module constants fixed at import, hence the patching."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
