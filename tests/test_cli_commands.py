"""The `hdee` subcommands doing their work (not only --help), and the CLI's argument parsers.

`prepare`, `jobs`, `train`, `run`, `evaluate` and `report` made the shared run `tiny_cli_run`
(conftest.py); these tests check what each left behind. `generate` runs here. Commands are run
in-process with `hdee.cli.main`, as a shell would run them.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from hdee.atomic import read_json
from hdee.cli import _overrides, main
from hdee.config import ConfigError, load_config
from hdee.layout import RunLayout


def hdee(*argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `hdee ARGV...`; argparse's exits count as statuses."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_info:
            code = int(exit_info.code or 0)
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------
# What the commands of the shared run did


def test_prepare_tokenized_every_corpus_and_split(tiny_cli_run):
    layout = RunLayout.of(tiny_cli_run["run_dir"])
    assert (layout.tokenizer / "tokenizer.json").is_file()
    assert (layout.root / "config.yaml").is_file()
    for corpus in ["general", "d0", "d1", "d2", "d3", "d4"]:
        for split in ("train", "validation", "test"):
            assert layout.tokens(corpus, split).stat().st_size > 0, (corpus, split)


def test_train_ran_each_seed_spec_that_jobs_listed(tiny_cli_run):
    outputs, layout = tiny_cli_run["outputs"], RunLayout.of(tiny_cli_run["run_dir"])
    listed = [line.split() for line in outputs["jobs seeds"].splitlines()]
    assert sorted(size for size in (job_id.split("-")[1] for job_id, *_ in listed)) == [
        "L",
        "M",
        "S",
    ]
    for job_id, iteration, parent, spec_path in listed:
        assert (iteration, parent) == ("0", "-")
        assert Path(spec_path) == layout.job(job_id).spec
        result = read_json(layout.job(job_id).result)
        assert result["steps"] == read_json(spec_path)["training"]["steps"] == 12
        assert (layout.job(job_id).final / "model.safetensors").is_file()
        # `hdee run --from difficulty` found the seeds finished and did not train them again.
        steps = [
            json.loads(line)["step"]
            for line in (layout.job(job_id).metrics).read_text().splitlines()
            if "loss" in json.loads(line)
        ]
        assert steps == sorted(set(steps)) and steps[-1] == 12


def test_run_evaluate_and_report_outputs(tiny_cli_run):
    outputs, layout = tiny_cli_run["outputs"], RunLayout.of(tiny_cli_run["run_dir"])
    plan = read_json(layout.plan)
    for job_id in plan["jobs"]:
        assert (layout.job(job_id).result).is_file(), job_id
    # --until experts: evaluation and report came from their own commands.
    results = read_json(layout.results)
    assert set(results["configurations"]) == {"MHo-IHo", "MHo-IHe", "MHe-IHo"}
    assert set(results["domains"]) == {"d0", "d1", "d2", "d3", "d4"}
    assert (layout.results_csv).read_text().startswith("configuration,")
    assert outputs["evaluate"] == ""  # --quiet
    assert Path(outputs["report"].strip()) == layout.report_markdown
    assert (layout.report_markdown).read_text().startswith("# HDEE report")


def test_generate_with_explicit_prior_and_a_domains_cached_prior(tiny_cli_run):
    run = str(tiny_cli_run["run_dir"])
    base = ["generate", run, "--configuration", "MHe-IHo", "--prompt", "the one"]
    base += ["--max-new-tokens", "8"]
    code, text, err = hdee(*base)
    assert code == 0, err
    assert text.startswith("the one") and len(text.strip()) > len("the one")
    # --prior cached:DOMAIN is the cached prior `hdee evaluate` stored, in member order.
    results = read_json(Path(run) / "evaluation" / "results.json")
    final = results["configurations"]["MHe-IHo"]["iterations"]["1"]
    prior = [final["domains"]["d1"]["cached_prior"][lane] for lane in final["experts"]]
    by_domain = hdee(*base, "--prior", "cached:d1")
    by_weights = hdee(*base, "--prior", ",".join(repr(w) for w in prior))
    assert by_domain[0] == by_weights[0] == 0
    assert by_domain[1] == by_weights[1]
    for argv, expected in [
        (["--prior", "1,2"], "prior 1,2: 2 weights for 3 members"),
        (["--prior", "cached:nowhere"], "'nowhere' is not an evaluation domain"),
        (["--prior", "d1"], "write cached:d1"),
        (["--iteration", "5"], "iterations 1..1, not 5"),
        (["--max-new-tokens", "100000000"], "--max-new-tokens 100000000: must be in 1.."),
    ]:
        code, _, err = hdee(*base, *argv)
        assert code == 2 and expected in err, (argv, err)


def test_evaluate_and_report_refuse_a_directory_that_is_not_a_run(tmp_path: Path):
    for command in ("evaluate", "report", "generate"):
        extra = ["--configuration", "x", "--prompt", "p"] if command == "generate" else []
        code, _, err = hdee(command, str(tmp_path), *extra)
        assert code != 0, command
        assert str(tmp_path) in err, (command, err)


def test_report_after_results_change(tiny_cli_run, tmp_path: Path):
    # `hdee report` re-reads results.json: a re-evaluation shows in the next report.
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_cli_run["run_dir"], run_dir)
    code, _, err = hdee("evaluate", str(run_dir), "--set", "evaluation.posterior=updating")
    assert code == 0, err
    code, out, err = hdee("report", str(run_dir))
    assert code == 0, err
    assert "the domain posterior is **updating**" in Path(out.strip()).read_text()


# ----------------------------------------------------------------------------------------------
# --set KEY=VALUE


def test_overrides_parse_values_as_yaml():
    assert _overrides(
        [
            "plan.iterations=2",
            "evaluation.methods=[uniform_prior, simple_average]",
            "evaluation.posterior = updating",
            "run_dir=/tmp/a=b",  # only the first '=' separates
            "evaluation.cached_prior_decay=0.5",
            "evaluation.every_iteration=true",
            "evaluation.max_test_sequences=null",
        ]
    ) == {
        "plan.iterations": 2,
        "evaluation.methods": ["uniform_prior", "simple_average"],
        "evaluation.posterior": "updating",
        "run_dir": "/tmp/a=b",
        "evaluation.cached_prior_decay": 0.5,
        "evaluation.every_iteration": True,
        "evaluation.max_test_sequences": None,
    }
    assert _overrides(None) == {} and _overrides([]) == {}


def test_overrides_without_equals_are_refused():
    with pytest.raises(ConfigError, match=r"--set 'plan\.iterations': expected KEY=VALUE"):
        _overrides(["plan.iterations"])


def test_set_reaches_nested_keys_of_the_config(tiny_cli_run):
    overrides = _overrides(["plan.iterations=3", "evaluation.methods=[cached_prior]"])
    config = load_config(tiny_cli_run["config_path"], overrides=overrides)
    assert config.plan.iterations == 3
    assert config.evaluation.methods == ["cached_prior"]
    assert config.seeds.training.steps == 12  # the rest as in the file


def test_set_errors_through_the_cli(tiny_cli_run):
    config = str(tiny_cli_run["config_path"])
    code, _, err = hdee("plan", config, "--set", "plan.iterations")
    assert code == 2 and "expected KEY=VALUE" in err
    code, _, err = hdee("plan", config, "--set", "plan.no_such_key=1")
    assert code == 2 and "no_such_key" in err
    code, _, err = hdee("plan", config, "--set", "plan.iterations=three")
    assert code == 2 and "plan.iterations" in err


# ----------------------------------------------------------------------------------------------
# --prior W,W,... (the grammar itself: tests/test_inference.py)


def test_bad_prior_is_an_argument_error(tiny_cli_run):
    run = str(tiny_cli_run["run_dir"])
    for weights in ("1,-2,1", "-1,1,1"):  # a leading "-" is a value, not an option
        code, _, err = hdee(
            "generate", run, "--configuration", "MHe-IHo", "--prompt", "p", "--prior", weights
        )
        assert code == 2
        assert "--prior" in err and "non-negative" in err and "expected one argument" not in err


def test_generate_routed_prints_expert_usage_and_writes_weights(tiny_cli_run, tmp_path):
    run = str(tiny_cli_run["run_dir"])
    base = ["generate", run, "--configuration", "MHe-IHo", "--prompt", "the one two three"]
    base += ["--max-new-tokens", "6"]
    weights = tmp_path / "weights.jsonl"
    code, text, err = hdee(
        *base, "--experts", "1", "--route-tokens", "2", "--weights-jsonl", str(weights)
    )
    assert code == 0, err
    assert text.startswith("the one two three")
    assert "routed to 1 after 2 tokens" in err
    usage = [line.split() for line in err.splitlines() if line.split()[-1:] in (["yes"], ["no"])]
    assert sorted(row[-1] for row in usage) == ["no", "no", "yes"]
    for row in usage:  # routed-away experts read the 2 routing tokens only
        assert (int(row[-2]) == 2) == (row[-1] == "no")
    header, *lines = [json.loads(line) for line in weights.read_text().splitlines()]
    assert header["ensemble"]["routing"] == "prefix" and header["ensemble"]["experts"] == 1
    assert 1 <= len(lines) <= 6 and lines[0]["step"] == 0
    kept = next(row[0] for row in usage if row[-1] == "yes")
    for line in lines:  # the prompt is longer than 2 tokens: routed before the first new one
        assert set(line["weights"]) == {row[0] for row in usage}
        assert line["weights"][kept] == pytest.approx(1.0)
    code, _, err = hdee(*base, "--experts", "4")
    assert code == 2 and "experts: k must be in 1..3" in err
    code, _, err = hdee(*base, "--experts", "1", "--route-tokens", "20")
    assert code == 2 and "--route-tokens 20: the ensemble routes after reading" in err
