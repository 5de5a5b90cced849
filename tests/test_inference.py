"""The inference seam: one ensemble spec, one live implementation, opt-out.

- every spec the grammar allows scores the same under `hdee evaluate`'s cached tensor maths
  and under the live model `generate`, `tasks` and `export` run (1e-5);
- an excluded member leaves no trace: the output is bit-identical to an ensemble built without
  it (cached evaluation, export, generation), and its weights are never loaded;
- every command records the resolved spec in what it writes;
- the opt-out study shows the withdrawn domain's perplexity rising.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hdee.cli import main
from hdee.config import load_config
from hdee.data.loaders import eval_batches
from hdee.data.tokens import load_tokens
from hdee.ensemble_spec import EnsembleSpec, Prior, parse_prior, plan_members, select_members
from hdee.evaluate import (
    LogProbCache,
    evaluate_ensemble_on_domain,
    evaluate_run,
    member_flops,
    spec_log_prior,
)
from hdee.generate import continue_from_run, generate_ids, prompt_ids
from hdee.hf_ensemble import HdeeEnsembleForCausalLM
from hdee.inference import build_ensemble, ensemble_label_log_probs, resolve_ensemble
from hdee.layout import RunLayout
from hdee.records import EvaluationResults, Plan
from hdee.routing import spec_mixture
from hdee.scoring import load_expert

CONFIGURATION = "MHe-IHo"  # S / M / L experts
DOMAIN = "d6"  # held out: every expert has some weight on it


# ----------------------------------------------------------------------------------------------
# The grammar


def test_prior_grammar_round_trips_and_names_what_it_expects() -> None:
    assert parse_prior("uniform") == Prior("uniform")
    assert parse_prior("cached").per_domain
    assert parse_prior("cached:bible") == Prior("cached", domain="bible")
    assert parse_prior("1,2,0.5") == Prior("weights", weights=(1.0, 2.0, 0.5))
    assert parse_prior([1, 3]) == Prior("weights", weights=(1.0, 3.0))
    for text in ("uniform", "cached", "cached:bible", "1,2,0.5"):
        assert str(parse_prior(text)) == text
    for bad, message in [
        ("bible", "write cached:bible"),
        ("cached:", "cached:DOMAIN with a domain name"),
        ("1,-1", "non-negative"),
        ("0,0", "not all 0"),
        ("1,nan", "finite"),
        ("", "expected uniform, cached"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_prior(bad)


def test_spec_keys_check_each_other() -> None:
    assert EnsembleSpec(experts=2).routing == "prefix"  # --experts K alone routes by prefix
    for keys, message in [
        ({"routing": "prefix"}, "give k"),
        ({"routing": "none", "experts": 2}, "not used with routing 'none'"),
        ({"routing": "budget"}, "flop_budget: required"),
        ({"flop_budget": 3.0}, "only used with routing: budget"),
        ({"routing": "prior", "experts": 1}, "a uniform prior ranks no expert"),
        ({"route_tokens": 0}, "greater than 0"),
        ({"members": "some"}, "latest"),
        ({"unknown": 1}, "Extra inputs"),
    ]:
        with pytest.raises(ValueError, match=message):
            EnsembleSpec(**keys)


def test_exclude_withdraws_a_member_and_every_descendant_of_a_domain(
    tiny_finished_run: Path,
) -> None:
    plan = Plan.read(RunLayout.of(tiny_finished_run).plan)
    _, forest = plan_members(plan, CONFIGURATION, members="all")
    first_easy = plan.schedule["easy"][0]  # trained easy@1; easy@2 branched from it
    keys = EnsembleSpec(members="all", exclude=[first_easy])
    _, kept, excluded = select_members(plan, CONFIGURATION, keys)
    assert set(excluded) == {"easy@1", "easy@2"}
    assert list(kept) == [name for name in forest if name not in excluded]
    by_job = EnsembleSpec(members="all", exclude=[forest["moderate@2"]])
    assert set(select_members(plan, CONFIGURATION, by_job)[2]) == {"moderate@2"}


# ----------------------------------------------------------------------------------------------
# One live implementation: the cached maths equal the live model for every spec


def _specs() -> list[dict[str, object]]:
    """Every combination of the grammar's keys (prior routing needs a prior that ranks)."""
    routings: list[dict[str, object]] = [
        {"routing": "none"},
        {"routing": "prefix", "experts": 1, "route_tokens": 3},
        {"routing": "prefix", "experts": 2, "route_tokens": 9},
        {"routing": "prior", "experts": 2},
        {"routing": "budget", "route_tokens": 5, "flop_budget": "two cheapest"},
    ]
    specs = []
    for members, posterior, prior, routing, exclude in itertools.product(
        ["latest", "all"],
        ["prefix", "updating"],
        ["uniform", "cached:d0", "weights"],
        routings,
        [[], ["easy"]],
    ):
        if routing["routing"] == "prior" and prior == "uniform":
            continue
        specs.append(
            {"members": members, "posterior": posterior, "prior": prior, **routing}
            | {"exclude": exclude if members == "latest" else [f"{e}@2" for e in exclude]}
        )
    return specs


@pytest.fixture(scope="module")
def scoring_setup(tiny_finished_run: Path) -> dict[str, object]:
    layout = RunLayout.of(tiny_finished_run)
    config = load_config(layout.config)
    tokens = load_tokens(layout.tokens(DOMAIN, "test"))
    windows = config.evaluation.max_test_sequences
    return {
        "layout": layout,
        "config": config,
        "cache": LogProbCache(layout, config, torch.device("cpu")),
        "batches": list(eval_batches(tokens, config.data.seq_len, 4, windows)),
        "loaded": {},
    }


@pytest.mark.parametrize("keys", _specs(), ids=lambda keys: json.dumps(keys, sort_keys=True))
def test_cached_evaluation_equals_the_live_model(
    scoring_setup: dict[str, object], keys: dict[str, object]
) -> None:
    layout, config = scoring_setup["layout"], scoring_setup["config"]
    cache = scoring_setup["cache"]
    plan = Plan.read(layout.plan)
    keys = dict(keys)
    chosen = EnsembleSpec(members=keys["members"], exclude=keys["exclude"])
    _, members, _ = select_members(plan, CONFIGURATION, chosen)
    job_ids = list(members.values())
    # The forest's earlier experts were never evaluated on this run: score them once here.
    cache.fill(
        [(job, d, s) for job in job_ids for d, s in [(DOMAIN, "test"), ("d0", "validation")]], False
    )
    flops = [member_flops(layout, job, config.data.seq_len) for job in job_ids]
    if keys["prior"] == "weights":
        keys["prior"] = ",".join(str(j + 1) for j in range(len(job_ids)))
    if keys.get("flop_budget") == "two cheapest":
        keys["flop_budget"] = sum(sorted(flops)[:2]) * 1.001
    spec = EnsembleSpec(**keys)
    resolved = resolve_ensemble(spec, config, layout, CONFIGURATION)
    model = build_ensemble(resolved, layout, config.data.seq_len, "cpu", scoring_setup["loaded"])
    live = torch.cat(
        [ensemble_label_log_probs(model, b).log_probs for b in scoring_setup["batches"]]
    )

    # `hdee evaluate`'s side: the same ensemble keys as evaluation settings, on cached log-probs.
    settings = config.evaluation.model_copy(update={"prior": spec.prior})
    test_lp = torch.stack([cache.get(job, DOMAIN, "test") for job in job_ids])
    log_prior = spec_log_prior(cache, job_ids, DOMAIN, settings)
    cached, kept, _ = spec_mixture(
        test_lp,
        log_prior,
        spec.posterior,
        spec.routing,
        spec.route_tokens,
        spec.experts,
        flops,
        spec.flop_budget,
    )
    torch.testing.assert_close(live, cached, atol=1e-5, rtol=0)
    if spec.routing != "none" and len(job_ids) > 2:  # k = 2 of 2 (or both fit) keeps all
        assert bool((~kept).any()), "the sweep's routing should drop some expert somewhere"


# ----------------------------------------------------------------------------------------------
# Opt-out: no trace of an excluded member


def test_excluded_member_in_cached_evaluation_is_bit_identical(
    tiny_finished_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_finished_run, run)
    layout = RunLayout.of(run)
    config = load_config(layout.config, overrides={"run_dir": str(run)})
    config = config.model_copy(
        update={"evaluation": config.evaluation.model_copy(update={"exclude": ["easy"]})}
    )
    results = evaluate_run(config, layout, progress=False)
    final = results.configurations[CONFIGURATION].final
    assert list(final.experts) == ["moderate", "difficult"]
    assert final.ensemble is not None and list(final.ensemble.excluded) == ["easy"]
    cache = LogProbCache(layout, config, torch.device("cpu"))
    job_ids = list(final.experts.values())
    for domain in ("d0", DOMAIN):
        test_lp = torch.stack([cache.get(job, domain, "test") for job in job_ids])
        validation = torch.stack([cache.get(job, domain, "validation") for job in job_ids])
        alone = evaluate_ensemble_on_domain(
            test_lp,
            validation,
            list(final.experts),
            job_ids,
            config.evaluation.methods,
            config.evaluation,
        )
        assert final.domains[domain] == alone  # every number, to the last bit
    assert EvaluationResults.read(layout.results).configurations[CONFIGURATION].final == final


def test_export_with_an_excluded_member_holds_none_of_its_weights(
    tiny_finished_run: Path, tmp_path: Path
) -> None:
    layout = RunLayout.of(tiny_finished_run)
    out = tmp_path / "optout"
    argv = ["export", str(tiny_finished_run), "--configuration", CONFIGURATION, str(out)]
    assert main([*argv, "--exclude", "easy"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert [e["name"] for e in config["experts"]] == ["moderate", "difficult"]
    assert list(config["hdee"]["ensemble"]["excluded"]) == ["easy"]
    easy_job = config["hdee"]["ensemble"]["excluded"]["easy"]
    withdrawn = load_file(str(layout.job(easy_job).final / "model.safetensors"))
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        assert not any(key.startswith("experts.2.") for key in keys)
        exported = [handle.get_tensor(key) for key in keys]
    for tensor in withdrawn.values():
        assert not any(t.shape == tensor.shape and torch.equal(t, tensor) for t in exported), (
            "a tensor of the withdrawn expert is in the export"
        )
    # Its logits are those of the ensemble built from the other two members, to the bit.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    plan = Plan.read(layout.plan)
    _, members = plan.ensemble(CONFIGURATION)
    others = [
        load_expert(layout.job(members[lane]).final, torch.device("cpu"))
        for lane in ("moderate", "difficult")
    ]
    built = HdeeEnsembleForCausalLM.from_experts(others).eval()
    ids = torch.tensor([[0, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, built(ids).logits)


def test_generation_with_an_excluded_member_equals_the_ensemble_without_it(
    tiny_finished_run: Path, tmp_path: Path
) -> None:
    layout = RunLayout.of(tiny_finished_run)
    spec = EnsembleSpec(exclude=["difficult"])
    continuation = continue_from_run(
        layout, CONFIGURATION, "the a of", spec=spec, max_new_tokens=8, stop_at_eos=False
    )
    assert continuation.members == ["easy", "moderate"]
    assert continuation.ensemble is not None
    assert list(continuation.ensemble.excluded) == ["difficult"]
    plan = Plan.read(layout.plan)
    _, members = plan.ensemble(CONFIGURATION)
    others = [
        load_expert(layout.job(members[lane]).final, torch.device("cpu"))
        for lane in ("easy", "moderate")
    ]
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(layout.tokenizer)
    alone = generate_ids(
        HdeeEnsembleForCausalLM.from_experts(others).eval(), prompt_ids(tokenizer, "the a of"), 8
    )
    assert continuation.generation.token_ids == alone.token_ids
    assert continuation.generation.token_log_probs == alone.token_log_probs
    assert continuation.generation.weights == alone.weights
    # The JSON lines say which ensemble generated them, first.
    out = tmp_path / "weights.jsonl"
    argv = ["generate", str(tiny_finished_run), "--configuration", CONFIGURATION]
    argv += ["--prompt", "the a of", "--max-new-tokens", "4", "--exclude", "difficult"]
    assert main([*argv, "--weights-jsonl", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["ensemble"]["excluded"] == {"difficult": members["difficult"]}
    assert lines[0]["ensemble"]["members"] == {lane: members[lane] for lane in ("easy", "moderate")}
    assert [line["step"] for line in lines[1:]] == [0, 1, 2, 3]
    assert set(lines[1]["weights"]) == {"easy", "moderate"}


def test_a_domains_cached_prior_is_the_one_hdee_evaluate_estimated(tiny_finished_run: Path) -> None:
    layout = RunLayout.of(tiny_finished_run)
    config = load_config(layout.config)
    resolved = resolve_ensemble(EnsembleSpec(prior="cached:d0"), config, layout, CONFIGURATION)
    results = EvaluationResults.read(layout.results)
    estimated = results.configurations[CONFIGURATION].final.domains["d0"].cached_prior
    assert resolved.prior_weights == estimated  # the same floats, in member order
    assert resolved.prior == "cached:d0"


# ----------------------------------------------------------------------------------------------
# The opt-out study in results.json and the report


def test_opt_out_study_shows_the_withdrawn_domain_rising(
    tiny_finished_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_finished_run, run)
    plan = Plan.read(RunLayout.of(run).plan)
    withdrawn = plan.schedule["easy"][-1]  # the latest easy expert's own domain
    assert main(["evaluate", str(run), "--quiet", "--set", f"evaluation.opt_out={withdrawn}"]) == 0
    results = EvaluationResults.read(RunLayout.of(run).results)
    assert results.opt_out is not None and len(results.opt_out) == len(plan.configurations)
    for study in results.opt_out:
        assert list(study.excluded) == ["easy"]
        final = results.configurations[study.configuration].final
        rising = study.domains[withdrawn]
        assert rising.low > 0 and rising.without_members > rising.with_members
        # "with" is the ensemble's own domain-posterior perplexity.
        for domain, entry in study.domains.items():
            assert entry.with_members == pytest.approx(
                final.domains[domain].methods["uniform_prior"].perplexity, rel=1e-9
            )
            assert entry.low <= entry.delta <= entry.high
    assert main(["report", str(run)]) == 0
    report = (run / "report" / "report.md").read_text()
    assert "## Opt-out: withdrawing experts at inference" in report
    assert f"### {withdrawn} withdrawn from {CONFIGURATION} (members: easy)" in report
    first = results.opt_out[0].domains[withdrawn]
    assert f"| **{withdrawn}** |" in report and f"{first.without_members:.2f}" in report


# ----------------------------------------------------------------------------------------------
# The method table


def test_a_registered_method_reaches_results_and_report_with_no_other_change(
    tiny_finished_run: Path, tmp_path: Path
) -> None:
    """A toy method (the public reference's mean of log-probabilities, a geometric mean that is
    not a distribution) registered in the table is validated, scored, compared and reported."""
    from hdee.ensemble import METHODS, Method, Mixed, register_method

    def geometric_mean(inputs):  # noqa: ANN001, ANN202
        return Mixed(inputs.test.mean(dim=0))

    run = tmp_path / "run"
    shutil.copytree(tiny_finished_run, run)
    register_method(Method("geometric_mean", "geometric mean of probabilities", geometric_mean))
    try:
        methods = "evaluation.methods=[uniform_prior, geometric_mean]"
        assert main(["evaluate", str(run), "--quiet", "--set", methods]) == 0
        assert main(["report", str(run)]) == 0
    finally:
        del METHODS["geometric_mean"]
    results = EvaluationResults.read(RunLayout.of(run).results)
    assert results.methods == ["uniform_prior", "geometric_mean"]
    final = results.configurations[CONFIGURATION].final
    ours = final.domains["d0"].methods["geometric_mean"].perplexity
    job_ids = list(final.experts.values())
    cache = LogProbCache(
        RunLayout.of(run), load_config(RunLayout.of(run).config), torch.device("cpu")
    )
    lp = torch.stack([cache.get(job, "d0", "test") for job in job_ids])
    assert ours == pytest.approx(float(torch.exp(-lp.double().mean())), rel=1e-6)
    pairs = {(d.reference, d.candidate) for d in results.uncertainty.methods}
    assert ("uniform_prior", "geometric_mean") in pairs  # compared by the intervals too
    report = (run / "report" / "report.md").read_text()
    assert "| geometric mean of probabilities |" in report
    with pytest.raises(Exception, match="unknown method"):  # gone from the table: refused
        load_config(RunLayout.of(run).config, overrides={"evaluation.methods": ["geometric_mean"]})
