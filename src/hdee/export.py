"""`hdee export`: a configuration's ensemble as a self-contained transformers model directory.

OUT/
  config.json              HdeeEnsembleConfig: members, lanes, posterior, prior, routing (top K
                           after N tokens, or none), auto_map
  model.safetensors        every member's weights (experts.<j>.*), never a pickle
  modeling_hdee.py         the model code (a copy of hdee/hf_ensemble.py: torch + transformers only)
  generation_config.json
  tokenizer.json, tokenizer_config.json, ...   the run's tokenizer

so `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(OUT)` load it anywhere transformers runs (docs/export.md).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from hdee import hf_ensemble
from hdee.ensemble import POSTERIOR_MODES
from hdee.generate import cached_prior_from_run
from hdee.hf_ensemble import HdeeEnsembleConfig, HdeeEnsembleForCausalLM
from hdee.integrity import verify_model_dir
from hdee.layout import RunLayout
from hdee.model import load_model
from hdee.outputs import check_output_directory, output_directory
from hdee.records import Plan
from hdee.routing import Members, ensemble_members

EXPORT_COMMAND = "hdee export"
MODELING_FILE = "modeling_hdee.py"
AUTO_MAP = {
    "AutoConfig": "modeling_hdee.HdeeEnsembleConfig",
    "AutoModelForCausalLM": "modeling_hdee.HdeeEnsembleForCausalLM",
}


@dataclass(frozen=True)
class Member:
    """One expert of an exported ensemble."""

    name: str  # lane@iteration, unique within the ensemble
    lane: str
    iteration: int
    job_id: str


def plan_ensembles(run_dir: str | Path) -> dict[str, list[dict[str, str]]]:
    """{configuration: its ensemble after each iteration ({lane: job id}, plan lane order)}.

    The one place this module reads plan.json (while its records become typed, only this
    function needs to follow)."""
    plan = Plan.read(RunLayout.of(run_dir).plan)
    return {
        name: [plan.ensemble(name, k)[1] for k in range(1, len(configuration.ensembles) + 1)]
        for name, configuration in plan.configurations.items()
    }


def select_members(
    run_dir: str | Path,
    configuration: str,
    iteration: int | None = None,
    members: Members = "latest",
) -> tuple[int, list[Member]]:
    """(iteration, members): `hdee.routing.ensemble_members` (the latest expert of every lane
    after `iteration`, default the last; or with members="all" BTM's growing forest), each
    named `lane@k` by the iteration k that trained it."""
    plan = Plan.read(RunLayout.of(run_dir).plan)
    if members not in ("latest", "all"):
        raise ValueError(f"--members must be 'latest' or 'all', got {members!r}")
    index, chosen = ensemble_members(plan, configuration, iteration, members)
    origins: dict[str, tuple[str, int]] = {}  # job id -> (lane, the iteration that trained it)
    for k in range(1, index + 1):
        for lane, job_id in plan.ensemble(configuration, k)[1].items():
            origins.setdefault(job_id, (lane, k))
    selected = []
    for job_id in chosen.values():
        lane, k = origins[job_id]
        selected.append(Member(f"{lane}@{k}", lane, k, job_id))
    return index, selected


def resolve_prior(
    run_dir: str | Path,
    configuration: str,
    iteration: int,
    members: list[Member],
    prior: str,
    members_mode: Members,
) -> tuple[list[float] | None, str]:
    """(weights or None for uniform, source) from --prior: "uniform", a domain's cached prior
    (estimated by `hdee evaluate` on its validation text), or explicit weights W,W,..."""
    if prior == "uniform":
        return None, "uniform"
    parts = prior.split(",")
    try:
        weights = [float(part) for part in parts]
    except ValueError:
        weights = None
    if weights is not None:
        if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"--prior {prior!r}: expected {len(members)} non-negative weights, not all 0, "
                f"one per member ({', '.join(m.name for m in members)})"
            )
        return weights, "explicit"
    if members_mode != "latest":
        raise ValueError(
            f"--prior {prior}: a domain's cached prior weighs the latest expert of each lane; "
            "with --members all give uniform or explicit weights"
        )
    ensemble = {member.lane: member.job_id for member in members}
    weights = cached_prior_from_run(
        RunLayout.of(run_dir), configuration, iteration, ensemble, prior
    )
    return weights, f"cached:{prior}"


def build_ensemble(
    run_dir: str | Path,
    configuration: str,
    iteration: int | None = None,
    members: Members = "latest",
    prior: str = "uniform",
    posterior: str = "prefix",
    experts: int | None = None,
    device: str | torch.device = "cpu",
    route_tokens: int = 32,
) -> HdeeEnsembleForCausalLM:
    """A configuration's ensemble as an `HdeeEnsembleForCausalLM`, in memory, in eval mode.

    `experts` K routes (hdee.routing's `prefix` rule): after `route_tokens` tokens each sequence
    keeps its top K experts by posterior; None (or every member) mixes them all."""
    if posterior not in POSTERIOR_MODES:
        raise ValueError(f"--posterior must be one of {POSTERIOR_MODES}, got {posterior!r}")
    layout = RunLayout.of(run_dir)
    index, chosen = select_members(run_dir, configuration, iteration, members)
    if experts is not None:
        if not 1 <= experts <= len(chosen):
            raise ValueError(f"--experts must be in 1..{len(chosen)} (the members), got {experts}")
        if route_tokens < 1:
            raise ValueError(f"--route-tokens must be >= 1, got {route_tokens}")
    weights, source = resolve_prior(run_dir, configuration, index, chosen, prior, members)
    models = []
    for member in chosen:
        model_dir = layout.job(member.job_id).final
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir}: expert {member.name} is not trained yet")
        verify_model_dir(model_dir)  # the weights its job recorded, or IntegrityError
        models.append(load_model(model_dir))
    config = HdeeEnsembleConfig(
        experts=[
            {
                "name": m.name,
                "lane": m.lane,
                "iteration": m.iteration,
                "job_id": m.job_id,
                "llama": model.config.to_dict(),
            }
            for m, model in zip(chosen, models, strict=True)
        ],
        posterior=posterior,
        prior=weights,
        prior_source=source,
        routing=(
            {"top_k": None} if experts is None else {"top_k": experts, "route_tokens": route_tokens}
        ),
        hdee={
            "run_dir": str(Path(run_dir).resolve()),
            "configuration": configuration,
            "iteration": index,
            "members": members,
        },
    )
    ensemble = HdeeEnsembleForCausalLM(config)
    for target, model in zip(ensemble.experts, models, strict=True):
        target.load_state_dict(model.state_dict())
    eos = models[0].config.eos_token_id
    ensemble.generation_config.eos_token_id = eos
    ensemble.generation_config.pad_token_id = eos
    return ensemble.to(device).eval()


def export_ensemble(
    run_dir: str | Path,
    configuration: str,
    out: str | Path,
    iteration: int | None = None,
    members: Members = "latest",
    prior: str = "uniform",
    posterior: str = "prefix",
    experts: int | None = None,
    route_tokens: int = 32,
    overwrite: bool = False,
) -> Path:
    """Write the ensemble's model directory to `out` atomically (replacing an older export;
    `overwrite`: beside what is in a directory that is not one, hdee.outputs)."""
    layout = RunLayout.of(run_dir)
    check_output_directory(out, EXPORT_COMMAND, "OUT", overwrite)  # before any model loads
    ensemble = build_ensemble(
        run_dir,
        configuration,
        iteration,
        members,
        prior,
        posterior,
        experts,
        route_tokens=route_tokens,
    )
    ensemble.config.auto_map = dict(AUTO_MAP)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(layout.tokenizer)
    out = Path(out)
    with output_directory(out, EXPORT_COMMAND, "OUT", overwrite) as tmp:
        ensemble.save_pretrained(tmp)  # safetensors: transformers never pickles weights here
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(hf_ensemble.__file__, tmp / MODELING_FILE)
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError(f"{out}: save_pretrained did not write model.safetensors")
    return out
