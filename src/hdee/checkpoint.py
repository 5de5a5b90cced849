"""A training job's checkpoints: HF model files + optimizer tensors (safetensors) + the rest
of the trainer state (JSON). Never a pickle.

    checkpoints/step_0000100/
        config.json, model.safetensors   the model, loadable by LlamaForCausalLM.from_pretrained
        trainer_state.safetensors        optimizer tensors (AdamW moments), by name
        trainer_state.json               step, learning rate, last loss, seconds, RNG state,
                                         optimizer param groups and scalars
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from hdee.atomic import atomic_directory, read_json, write_json
from hdee.layout import CHECKPOINT_PREFIX, JobLayout
from hdee.model import check_safetensors, load_model, write_model_files

TRAINER_STATE_JSON = "trainer_state.json"
TRAINER_STATE_TENSORS = "trainer_state.safetensors"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into named tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, _, index, key = name.split(".", 3)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, Any]:
    # Training itself uses no randomness (dropout 0, data from the step); saved so anything
    # stochastic added later resumes exactly too.
    state: dict[str, Any] = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and "cuda" in state:
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def checkpoint_dirs(job: JobLayout) -> list[Path]:
    """Complete step checkpoints, oldest first (temporary `.step_*` dirs are not listed)."""
    root = job.checkpoints
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> Path:
    """Write one checkpoint atomically: HF model files plus trainer state."""
    with atomic_directory(directory) as tmp:
        write_model_files(model, tmp)  # type: ignore[arg-type]
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / TRAINER_STATE_TENSORS))
        write_json(tmp / TRAINER_STATE_JSON, {**state, "optimizer": meta})
    return directory


def load_checkpoint(
    directory: Path, device: torch.device, attn_implementation: str
) -> tuple[LlamaForCausalLM, dict[str, Any], dict[str, Any]]:
    """(model, trainer state JSON, optimizer state dict) of a checkpoint; ValueError naming
    the file when any part is missing or corrupt."""
    state_path = directory / TRAINER_STATE_JSON
    if not state_path.is_file():
        raise ValueError(f"{state_path}: trainer state is missing")
    state = read_json(state_path)
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise ValueError(f"{state_path}: not a trainer state (no 'step' / 'optimizer')")
    tensor_path = directory / TRAINER_STATE_TENSORS
    check_safetensors(tensor_path)
    try:
        tensors = load_file(str(tensor_path))
    except Exception as error:  # safetensors has its own error types
        raise ValueError(f"{tensor_path}: corrupt trainer state ({error})") from None
    model = load_model(directory, device, torch.float32, attn_implementation)
    return model, state, _unflatten_optimizer(tensors, state["optimizer"])


def prune_checkpoints(job: JobLayout, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints."""
    for old in checkpoint_dirs(job)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def cleanup_temporaries(job: JobLayout) -> None:
    """Remove temporary directories a killed writer left behind (`.name.XXXX.tmp`)."""
    for parent in (job.root, job.checkpoints):
        if parent.is_dir():
            for path in parent.glob(".*.tmp"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
