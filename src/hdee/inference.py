"""The inference seam: an ensemble spec resolved against a run, built as the one live model.

    EnsembleSpec (flags, or the run's evaluation keys)
        -- resolve_ensemble -->  records.ResolvedEnsemble   (members, prior weights, routing;
                                                             written into every output)
        -- build_ensemble  -->  hf_ensemble.HdeeEnsembleForCausalLM   (what `hdee generate`,
                                                             `tasks` and `export` run)

as training has its seam (a TrainSpec through the runners into the loop). `hdee evaluate`
resolves the same keys (`ensemble_spec.select_members`) and mixes cached label log-probs with
the same rules; `ensemble_label_log_probs` scores text with the live model (the benchmarks'
routed scorer, and the test that keeps both equal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hdee.config import ExperimentConfig
from hdee.ensemble_spec import EnsembleSpec, SpecError, select_members
from hdee.evaluate import LogProbCache, member_flops, spec_prior
from hdee.hf_ensemble import HdeeEnsembleConfig, HdeeEnsembleForCausalLM
from hdee.layout import RunLayout
from hdee.records import Plan, ResolvedEnsemble
from hdee.scoring import load_expert, resolve_device
from hdee.selection import feasible_subsets


def resolve_ensemble(
    spec: EnsembleSpec,
    config: ExperimentConfig,
    layout: RunLayout,
    configuration: str,
    progress: bool = False,
) -> ResolvedEnsemble:
    """Which experts, prior and routing `spec` means for `configuration` of this run. Checked
    before any model loads: a spec that does not fit is a SpecError naming the key. A
    `cached:DOMAIN` prior is estimated exactly as `hdee evaluate` estimates it, from the
    members' label log-probs on DOMAIN's validation windows (cached; computed if missing)."""
    plan = Plan.read(layout.plan)
    if configuration not in plan.configurations:
        raise SpecError(
            f"--configuration {configuration!r} is not in the plan ({layout.plan}); choose one of "
            f"{', '.join(plan.configurations)}"
        )
    try:
        iteration, members, excluded = select_members(plan, configuration, spec, spec.iteration)
    except SpecError:
        raise
    except ValueError as error:  # an iteration the configuration does not have
        raise SpecError(f"iteration: {error}") from None
    count = len(members)
    left = " left after exclude" if excluded else ""
    if spec.experts is not None and spec.experts > count:
        raise SpecError(f"experts: k must be in 1..{count} (the members{left}), got {spec.experts}")
    weights = _prior_weights(spec, config, layout, plan, list(members.values()), progress)
    if spec.routing == "budget":
        assert spec.flop_budget is not None
        flops = [member_flops(layout, job, config.data.seq_len) for job in members.values()]
        try:
            feasible_subsets(flops, spec.flop_budget)
        except ValueError as error:
            raise SpecError(f"flop_budget: {error}") from None
    return ResolvedEnsemble(
        configuration=configuration,
        iteration=iteration,
        members=members,
        excluded=excluded,
        prior=spec.prior,
        prior_weights=dict(zip(members, weights, strict=True)) if weights else None,
        posterior=spec.posterior,
        routing=spec.routing,
        experts=spec.experts,
        route_tokens=spec.route_tokens if spec.routing in ("prefix", "budget") else None,
        flop_budget=spec.flop_budget,
    )


def _prior_weights(
    spec: EnsembleSpec,
    config: ExperimentConfig,
    layout: RunLayout,
    plan: Plan,
    job_ids: list[str],
    progress: bool,
) -> list[float] | None:
    """P(j) per member, or None for uniform: `hdee.evaluate.spec_prior`, the rule evaluation
    applies, on the members' cached validation log-probs (computed here if missing)."""
    prior = spec.prior_choice
    if prior.kind == "uniform":
        return None
    if prior.kind == "cluster":
        # The router exists (hdee.clusters.ClusterRouter, evaluated by `hdee evaluate`), but
        # the live model does not carry it yet: refuse rather than run another prior.
        raise SpecError(
            "prior cluster: only `hdee evaluate` routes by clusters so far; generate, export "
            "and tasks take uniform, cached:DOMAIN or W,W,..."
        )
    if prior.per_domain:
        raise SpecError(
            "prior 'cached' is each evaluated domain's own cached prior (hdee evaluate); here "
            "give the domain whose validation text should weigh the experts: cached:DOMAIN"
        )
    cache = LogProbCache(layout, config, resolve_device())
    domain = prior.domain
    if domain is not None:
        domains = plan.domain_kinds()
        if domain not in domains:
            raise SpecError(
                f"prior {spec.prior}: {domain!r} is not an evaluation domain of this run; "
                f"choose one of {', '.join(domains)}"
            )
        cache.fill([(job, domain, "validation") for job in job_ids], progress)
    settings = config.evaluation.model_copy(update={"prior": spec.prior})
    weights = spec_prior(cache, job_ids, domain or "", settings)
    assert weights is not None
    return weights.tolist()


def build_ensemble(
    resolved: ResolvedEnsemble,
    layout: RunLayout,
    seq_len: int,
    device: str | torch.device | None = None,
    loaded: dict[str, torch.nn.Module] | None = None,
) -> HdeeEnsembleForCausalLM:
    """The resolved ensemble as an `HdeeEnsembleForCausalLM`, in eval mode: only its members'
    weights are loaded (an excluded member's never are), each checked against the hash its job
    recorded. `loaded` (job id -> model) reuses models already in memory."""
    device = torch.device(device) if device is not None else resolve_device()
    plan = Plan.read(layout.plan)
    models = []
    for job_id in resolved.members.values():
        model = (loaded or {}).get(job_id)
        if model is None:
            model = load_expert(layout.job(job_id).final, device)
            if loaded is not None:
                loaded[job_id] = model
        models.append(model.to(device).eval())
    routing: dict[str, object] = {"mode": resolved.routing}
    if resolved.routing in ("prefix", "prior"):
        routing["top_k"] = resolved.experts
    if resolved.routing in ("prefix", "budget"):
        routing["route_tokens"] = resolved.route_tokens
    if resolved.routing == "budget":
        routing["flop_budget"] = resolved.flop_budget
        routing["flops"] = [member_flops(layout, job, seq_len) for job in resolved.members.values()]
    config = HdeeEnsembleConfig(
        experts=[
            {
                "name": name,
                "lane": plan.jobs[job_id].lane,
                "iteration": plan.jobs[job_id].iteration,
                "job_id": job_id,
                "llama": model.config.to_dict(),
            }
            for (name, job_id), model in zip(resolved.members.items(), models, strict=True)
        ],
        posterior=resolved.posterior,
        prior=list(resolved.prior_weights.values()) if resolved.prior_weights else None,
        prior_source=resolved.prior,
        routing=routing,
        hdee={
            "run_dir": str(layout.root.resolve()),
            "configuration": resolved.configuration,
            "iteration": resolved.iteration,
            "ensemble": resolved.model_dump(mode="json", exclude_none=True),
        },
    )
    return HdeeEnsembleForCausalLM.from_experts(models, config).eval()


@dataclass
class EnsembleScores:
    """What `ensemble_label_log_probs` computed for a batch."""

    log_probs: Tensor  # [B, T] float64: the ensemble's log-prob of each label
    kept: Tensor  # [E, B] boolean: the experts each sequence mixed at the end
    route_tokens: int  # r: positions every member ran on (0: no routing prefix)
    tokens_run: list[int]  # per expert: input tokens it ran a forward pass on


@torch.inference_mode()
def ensemble_label_log_probs(model: HdeeEnsembleForCausalLM, batch: Tensor) -> EnsembleScores:
    """The live ensemble's label log-probs of `batch` `[B, T + 1]` (inputs `batch[:, :-1]`,
    labels `batch[:, 1:]`), running only what routing keeps: the routing prefix is given as its
    own chunk, so at its end each row keeps its experts and the others never run on it again."""
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"batch must be [B, T + 1] with T >= 1, got shape {tuple(batch.shape)}")
    batch = batch.to(model.device)
    inputs, labels = batch[:, :-1], batch[:, 1:]
    routing = model.config.routing
    r = routing.get("route_tokens", 0) if routing["mode"] in ("prefix", "budget") else 0
    pieces = [(0, min(r, inputs.shape[1])), (min(r, inputs.shape[1]), inputs.shape[1])]
    cache, parts = None, []
    for start, end in pieces:
        if end <= start:
            continue
        out = model(
            input_ids=inputs[:, start:end],
            label_ids=labels[:, start:end],
            cache=cache,
            use_cache=True,
        )
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        parts.append(out.label_log_probs)
    assert cache is not None
    kept = cache.kept | ~cache.routed[:, None]
    return EnsembleScores(
        log_probs=torch.cat(parts, dim=1).cpu(),
        kept=kept.T.cpu(),
        route_tokens=r if bool(cache.routed.any()) and routing["mode"] != "prior" else 0,
        tokens_run=cache.tokens_run.tolist(),
    )
