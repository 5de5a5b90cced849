"""Shared test helpers: tiny configs built inline (litgpt style)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def tiny_config_dict(
    run_dir: Path, n_domains: int = 12, held_out: int = 3, **sections: Any
) -> dict[str, Any]:
    """A valid experiment config dict over local files that need not exist (for planning)."""
    raw: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": {
            "seq_len": 32,
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "general": {"name": "general", "source": {"type": "local", "paths": ["general"]}},
            "domains": [
                {"name": f"d{i}", "source": {"type": "local", "paths": [f"d{i}"]}}
                for i in range(n_domains)
            ],
        },
        "model": {"preset": "tiny"},
        "plan": {"held_out": [f"d{i}" for i in range(n_domains - held_out, n_domains)]},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.fixture
def config_dict(tmp_path: Path) -> dict[str, Any]:
    return tiny_config_dict(tmp_path / "run")
