"""`hdee export`: the ensemble as a transformers model equals `hdee evaluate` and `hdee generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hdee.atomic import read_json
from hdee.cli import main
from hdee.config import load_config
from hdee.data.loaders import eval_batches
from hdee.data.tokens import load_tokens
from hdee.ensemble import mixture_log_probs
from hdee.ensemble_spec import EnsembleSpec, plan_members
from hdee.evaluate import read_cached_log_probs
from hdee.generate import continue_from_run, generate_from_run
from hdee.hf_ensemble import HdeeEnsembleConfig, HdeeEnsembleForCausalLM
from hdee.inference import build_ensemble, resolve_ensemble
from hdee.layout import RunLayout
from hdee.records import Plan
from hdee.routing import route, routed_mixture

CONFIGURATION = "MHe-IHo"  # S / M / L experts: heterogeneous widths are the normal case


def live(run_dir: Path, **keys: object) -> HdeeEnsembleForCausalLM:
    """The live ensemble an ensemble spec describes (what generate, tasks and export run)."""
    layout = RunLayout.of(run_dir)
    config = load_config(layout.config)
    resolved = resolve_ensemble(EnsembleSpec(**keys), config, layout, CONFIGURATION)
    return build_ensemble(resolved, layout, config.data.seq_len, "cpu")


@pytest.fixture(scope="module")
def exported(tiny_finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "ensemble"
    assert main(["export", str(tiny_finished_run), "--configuration", CONFIGURATION, str(out)]) == 0
    return out


def exported_label_log_probs(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch[:, :-1]).logits
            rows.append(torch.log_softmax(logits, -1).gather(2, batch[:, 1:, None])[..., 0])
    return torch.cat(rows)


def test_export_directory_is_self_describing_safetensors(exported: Path) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hdee.HdeeEnsembleForCausalLM"
    assert config["posterior"] == "prefix" and config["prior_source"] == "uniform"
    assert [e["lane"] for e in config["experts"]] == ["easy", "moderate", "difficult"]
    assert len({e["llama"]["intermediate_size"] for e in config["experts"]}) == 3
    assert (exported / "modeling_hdee.py").is_file()
    assert not list(exported.glob("*.bin")) and not list(exported.glob("*.pt"))
    with safe_open(str(exported / "model.safetensors"), framework="pt") as handle:
        assert any(key.startswith("experts.2.") for key in handle.keys())
    assert "import hdee" not in (exported / "modeling_hdee.py").read_text()


@pytest.mark.parametrize(
    ("prior", "posterior"),
    [
        ("uniform", "prefix"),
        ("cached:d0", "prefix"),
        ("uniform", "updating"),
        ("cached:d6", "updating"),
    ],
)
def test_label_log_probs_equal_hdee_evaluate(
    tiny_finished_run: Path, prior: str, posterior: str
) -> None:
    """The exported model's label log-probs are the mixture `hdee evaluate` computes from its
    cached per-expert log-probs (same windows, same prior), to 1e-5."""
    layout = RunLayout.of(tiny_finished_run)
    config = load_config(layout.config)
    model = live(tiny_finished_run, prior=prior, posterior=posterior)
    _, jobs = Plan.read(layout.plan).ensemble(CONFIGURATION)
    results = read_json(layout.results)
    final = results["configurations"][CONFIGURATION]["iterations"]["2"]["domains"]
    for domain in ("d0", "d6"):  # a trained and a held-out domain
        tokens = load_tokens(layout.tokens(domain, "test"))
        seq_len, windows = config.data.seq_len, config.evaluation.max_test_sequences
        batches = list(eval_batches(tokens, seq_len, 4, windows))
        ours = exported_label_log_probs(model, batches)
        cached = []
        for job_id in jobs.values():
            path = layout.label_logprobs(job_id, domain, "test")
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
            cached.append(read_cached_log_probs(path, metadata))
        log_prior = None
        if prior != "uniform":
            source = prior.split(":")[1]
            log_prior = torch.tensor([final[source]["cached_prior"][lane] for lane in jobs]).log()
        theirs = mixture_log_probs(torch.stack(cached), log_prior, posterior)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        if posterior == results["posterior"]:  # results.json holds the configured mode
            method = "uniform_prior" if prior == "uniform" else "cached_prior"
            if prior in ("uniform", f"cached:{domain}"):
                expected = final[domain]["methods"][method]["perplexity"]
                assert torch.exp(-ours.double().mean()).item() == pytest.approx(expected, rel=1e-5)


def test_greedy_generation_equals_hdee_generate(exported: Path, tiny_finished_run: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    prompt = "the a of"
    ours = generate_from_run(
        RunLayout.of(tiny_finished_run), CONFIGURATION, prompt, max_new_tokens=12, stop_at_eos=False
    )
    ids = [tokenizer.eos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True) == ours


def test_left_padding_does_not_move_the_posterior(exported: Path) -> None:
    """A left-padded row of a batch generates exactly what it generates alone: padding is no
    evidence and positions start at the first real token."""
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    eos = tokenizer.eos_token_id
    short = [eos] + tokenizer.encode("the of", add_special_tokens=False)
    long = [eos] + tokenizer.encode("he was for on are with as", add_special_tokens=False)
    pad = len(long) - len(short)
    batch = torch.tensor([[eos] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None}
    together = model.generate(batch, attention_mask=mask, **kwargs)
    alone = model.generate(torch.tensor([short]), **kwargs)
    assert together[0, pad:].tolist() == alone[0].tolist()
    # And the mixture's log-probs of the real tokens are the same with and without padding.
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits[0, pad:]
        unpadded = model(torch.tensor([short])).logits[0]
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=0)


def test_sampling_pipeline_and_save_pretrained_round_trip(exported: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    ids = torch.tensor([[0, 5, 9, 14]])
    torch.manual_seed(3)
    first = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, eos_token_id=None)
    torch.manual_seed(3)
    again = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, eos_token_id=None)
    assert first.tolist() == again.tolist() and first.shape[1] == 10
    model.save_pretrained(tmp_path / "copy")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    generator = pipeline("text-generation", model=str(exported), trust_remote_code=True)
    text = generator("the a", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("the a") and len(text) > len("the a")


def test_members_all_is_the_growing_forest(tiny_finished_run: Path, tmp_path: Path) -> None:
    plan = Plan.read(RunLayout.of(tiny_finished_run).plan)
    iteration, members = plan_members(plan, CONFIGURATION, members="all")
    assert iteration == 2 and len(members) == 6
    assert list(members)[:3] == ["easy@1", "moderate@1", "difficult@1"]
    out = tmp_path / "forest"
    argv = ["export", str(tiny_finished_run), "--configuration", CONFIGURATION, str(out)]
    assert main([*argv, "--members", "all", "--prior", "1,1,1,1,1,3"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert len(config["experts"]) == 6 and config["prior"][-1] == pytest.approx(3 / 8)
    _, first = plan_members(plan, CONFIGURATION, iteration=1)
    assert list(first.values()) == list(members.values())[:3]
    assert [e["name"] for e in config["experts"]] == list(members)


def test_bad_export_arguments_are_named(tiny_finished_run: Path, tmp_path: Path, capsys) -> None:
    """Every bad ensemble flag is refused before a model loads, exit 2, naming the flag."""
    argv = ["export", str(tiny_finished_run), "--configuration", CONFIGURATION, str(tmp_path / "x")]
    cases = [
        (["--prior", "1,2"], "prior 1,2: 2 weights for 3 members"),
        (["--experts", "4"], "experts: k must be in 1..3 (the members), got 4"),
        (["--prior", "cached"], "give the domain whose validation text"),
        (["--prior", "cached:nope"], "'nope' is not an evaluation domain"),
        (["--iteration", "5"], "iterations 1..2, not 5"),
        (["--routing", "prefix"], "--experts: routing 'prefix' keeps the top k: give k"),
        (["--routing", "budget"], "--flop-budget: required with routing: budget"),
        (["--routing", "budget", "--flop-budget", "1"], "flop_budget 1 FLOPs/token fits no expert"),
        (["--exclude", "nope"], "exclude 'nope' matches no member"),
        (["--exclude", "general"], "withdraws every member"),
        (["--configuration", "nope"], "'nope' is not in"),
    ]
    for flags, message in cases:
        assert main([*argv, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    for flags, message in [  # argparse's own checks: the grammar and ranges
        (["--experts", "2", "--route-tokens", "0"], "--route-tokens: must be >= 1"),
        (["--prior", "-1,1,1"], "--prior: -1,1,1: weights must be non-negative"),
        (["--members", "all", "--prior", "d0"], "for the cached prior of a domain write cached:d0"),
    ]:
        with pytest.raises(SystemExit) as raised:
            main([*argv, *flags])
        assert raised.value.code == 2
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "x").exists()


def cached_test_log_probs(run_dir: Path, domain: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(evaluation windows, the cached per-expert label log-probs `[E, N, T]` on them)."""
    layout = RunLayout.of(run_dir)
    config = load_config(layout.config)
    _, jobs = Plan.read(layout.plan).ensemble(CONFIGURATION)
    tokens = load_tokens(layout.tokens(domain, "test"))
    seq_len, windows = config.data.seq_len, config.evaluation.max_test_sequences
    batches = list(eval_batches(tokens, seq_len, 4, windows))
    cached = []
    for job_id in jobs.values():
        path = layout.label_logprobs(job_id, domain, "test")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        cached.append(read_cached_log_probs(path, metadata))
    return batches, torch.stack(cached)


@pytest.mark.parametrize(("experts", "route_tokens"), [(1, 5), (2, 12), (3, 5)])
def test_routed_label_log_probs_equal_hdee_routing(
    tiny_finished_run: Path, experts: int, route_tokens: int
) -> None:
    """With --experts K the exported model scores exactly `hdee.routing.routed_mixture` (prefix
    routing after --route-tokens) on the cached per-expert log-probs; K = E is the dense mix."""
    model = live(tiny_finished_run, experts=experts, route_tokens=route_tokens)
    assert model.config.routing == {
        "mode": "prefix",
        "top_k": experts,
        "route_tokens": route_tokens,
    }
    batches, lp = cached_test_log_probs(tiny_finished_run, "d6")
    ours = exported_label_log_probs(model, batches)
    kept, r = route(lp, None, "prefix", "prefix", route_tokens, experts)
    theirs = routed_mixture(lp, None, "prefix", r, kept)
    torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=0)
    dense = mixture_log_probs(lp, None, "prefix").double()
    if experts == 3:
        torch.testing.assert_close(ours.double(), dense, atol=1e-5, rtol=0)
    else:  # routing really changed the numbers after r, and only there
        torch.testing.assert_close(ours[:, :r].double(), dense[:, :r], atol=1e-5, rtol=0)
        assert (ours[:, r:].double() - dense[:, r:]).abs().max() > 1e-3


@pytest.mark.parametrize("route_tokens", [2, 7])  # inside the prompt / during generation
def test_routed_greedy_generation_equals_hdee_generate(
    tiny_finished_run: Path, route_tokens: int
) -> None:
    """Greedy generate() of a routed export equals `hdee generate --experts 1 --route-tokens N`,
    and the routed-away experts stop running once the sequence has routed."""
    model = live(tiny_finished_run, experts=1, route_tokens=route_tokens)
    tokenizer = AutoTokenizer.from_pretrained(RunLayout.of(tiny_finished_run).tokenizer)
    prompt = "the a of"
    theirs = continue_from_run(
        RunLayout.of(tiny_finished_run),
        CONFIGURATION,
        prompt,
        spec=EnsembleSpec(experts=1, route_tokens=route_tokens),
        max_new_tokens=12,
        stop_at_eos=False,
    )
    calls = [0] * len(model.experts)
    for j, expert in enumerate(model.experts):
        expert.register_forward_hook(lambda *_, j=j: calls.__setitem__(j, calls[j] + 1))
    ids = [tokenizer.eos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True) == theirs.text
    kept = theirs.generation.kept
    assert len(kept) == 1
    # Prefill + 11 steps for the kept expert; the others stop at the step that routes.
    assert calls[kept[0]] == 12
    assert all(calls[j] < 12 for j in range(len(calls)) if j != kept[0])
    if route_tokens < len(ids):  # routed inside the prompt: the others ran the prefill only
        assert sorted(calls) == [1, 1, 12]


def test_routed_left_padding_and_config_round_trip(tiny_finished_run: Path, tmp_path: Path) -> None:
    """A routed export: a left-padded row generates what it generates alone (each row routes at
    its own N-th real token and keeps its own experts), and the routing survives
    save_pretrained / from_pretrained."""
    out = tmp_path / "routed"
    argv = ["export", str(tiny_finished_run), "--configuration", CONFIGURATION, str(out)]
    assert main([*argv, "--experts", "1", "--route-tokens", "2"]) == 0
    routing = {"mode": "prefix", "top_k": 1, "route_tokens": 2}
    assert read_json(out / "config.json")["routing"] == routing
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    eos = tokenizer.eos_token_id
    short = [eos] + tokenizer.encode("the of", add_special_tokens=False)
    long = [eos] + tokenizer.encode("he was for on are with as", add_special_tokens=False)
    pad = len(long) - len(short)
    batch = torch.tensor([[eos] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None}
    together = model.generate(batch, attention_mask=mask, **kwargs)
    assert together[0, pad:].tolist() == model.generate(torch.tensor([short]), **kwargs)[0].tolist()
    with torch.no_grad():  # both rows reached N = 2 real tokens: each kept its own one expert
        cache = model(batch, attention_mask=mask, use_cache=True).cache
        alone = [model(torch.tensor([row]), use_cache=True).cache for row in (short, long)]
    assert cache.routed.tolist() == [True, True] and cache.kept.sum(dim=1).tolist() == [1, 1]
    assert cache.kept.tolist() == [a.kept[0].tolist() for a in alone]
    model.save_pretrained(tmp_path / "copy")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert reloaded.config.routing == routing
    ids = torch.tensor([long])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="routing.top_k must be an integer in 1..3"):
        HdeeEnsembleConfig(experts=model.config.experts, routing={"top_k": 4, "route_tokens": 4})
    with pytest.raises(ValueError, match="routing.route_tokens must be an integer >= 1"):
        HdeeEnsembleConfig(experts=model.config.experts, routing={"top_k": 1})
