"""The `hdee` command. Thin: parse arguments, load the config, call one function, report errors.

Every subcommand calls the same function the tests call; nothing about the method lives here.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml

from hdee import __version__
from hdee.config import (
    STAGES,
    ConfigError,
    ExperimentConfig,
    RunConfig,
    UsageError,
    load_config,
)
from hdee.layout import RunLayout

EXAMPLES = """\
examples:
  hdee demo --quick                      the whole experiment on built-in text, ~2 minutes
  hdee plan configs/tiny.yaml            jobs and compute budgets, before anything runs
  hdee run configs/tiny.yaml             every stage into the run directory (re-run resumes)
  hdee run configs/tiny.yaml --until seeds
  hdee discover my-corpus.yaml           cluster an unlabelled corpus into domains
  hdee evaluate runs/tiny && hdee report runs/tiny
  hdee generate runs/tiny --configuration MHe-IHo --prompt "In the beginning"
  hdee export runs/tiny --configuration MHe-IHo exports/MHe-IHo
  hdee tasks runs/tiny --tasks builtin
  hdee migrate runs/tiny --dry-run       records an older hdee wrote, in this version's shape

environment:
  HDEE_PROGRESS=auto|1|plain|0   progress: a live bar on a terminal and plain lines otherwise
                                 (auto, the default), always a bar (1), always plain lines
                                 (plain), none (0; a command's --quiet is the same)
  HDEE_DEBUG=1                   show the traceback of an error too

exit codes (docs/cli.md):
  0 done; 1 a runtime failure (a job failed, a stage's inputs missing, a corrupt file, I/O);
  2 a bad argument or config (checked before any model loads; nothing written); 130 interrupted

outputs: a path you name (export's OUT, --weights-jsonl, a run_dir, --run-dir) is written only
  when new, empty or an earlier output of the same command, whose files alone are replaced;
  --overwrite writes beside what is there, never replacing what hdee did not write
"""

QUIET_HELP = "no progress bars or lines (the same as HDEE_PROGRESS=0)"
RUN_OVERWRITE_HELP = (
    "start the run in a directory that is not empty and not an earlier run: hdee's files go "
    "beside what is there; nothing in it is removed or replaced (docs/cli.md)"
)


def _overrides(
    pairs: list[str] | None, command: str | None = None, sections: tuple[str, ...] = ()
) -> dict[str, Any]:
    """KEY=VALUE pairs of --set. With `sections`, only keys under those sections are allowed:
    a command that reads a finished run cannot change what was trained."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. plan.iterations=2")
        key, value = pair.split("=", 1)
        key = key.strip()
        if sections and key.split(".")[0] not in sections:
            allowed = ", ".join(f"{section}.*" for section in sections)
            raise ConfigError(
                f"--set {pair!r}: `hdee {command}` only takes {allowed} keys; the run's other "
                "settings (data, models, plan, seed) are fixed by what it trained"
            )
        try:
            result[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({error})") from None
    return result


def _config(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, overrides=_overrides(getattr(args, "set", None)))


def _existing_run(run_dir: str) -> RunLayout:
    """The layout of a run directory `hdee run` made (before a command locks or reads it)."""
    layout = RunLayout.of(run_dir)
    if not layout.config.is_file():
        raise ConfigError(
            f"{layout.config}: not found; is {run_dir!r} a run directory made by `hdee run`?"
        )
    return layout


def _run_config(
    run_dir: str,
    extra: list[str] | None = None,
    command: str = "evaluate",
    extra_overrides: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """The resolved config a run directory holds (its run_dir pointed at where it is now).
    `extra` (--set) may change evaluation settings only."""
    path = _existing_run(run_dir).config
    changes = _overrides(extra, command, sections=("evaluation",))
    overrides = {"run_dir": str(Path(run_dir).resolve()), **changes, **(extra_overrides or {})}
    return load_config(path, overrides=overrides)


# ----------------------------------------------------------------------------------------------
# The ensemble flags: one set for evaluate, generate, export and tasks (hdee.ensemble_spec)

ENSEMBLE_FLAGS = (
    "members",
    "iteration",
    "exclude",
    "prior",
    "posterior",
    "routing",
    "experts",
    "route_tokens",
    "flop_budget",
)


def _ensemble_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ensemble flags the user gave (unset flags keep the run's or the spec's defaults)."""
    given = {key: getattr(args, key, None) for key in ENSEMBLE_FLAGS}
    return {key: value for key, value in given.items() if value not in (None, [])}


def _ensemble_spec(args: argparse.Namespace, layout: RunLayout) -> Any:
    """The ensemble a single-ensemble command runs: the run's evaluation keys
    (`spec_defaults`), then the flags. A spec that does not validate names the flag (exit 2)."""
    from pydantic import ValidationError

    from hdee.ensemble_spec import EnsembleSpec, spec_defaults

    flags = _ensemble_flags(args)
    experts = flags.get("experts")
    if experts is not None:
        if len(experts) != 1:
            raise ConfigError(
                f"--experts {','.join(map(str, experts))}: `hdee {args.command}` runs one "
                "ensemble; give one K (hdee evaluate sweeps several)"
            )
        flags["experts"] = experts[0]
    run_keys = _run_config(str(layout.root), command=args.command).evaluation
    try:
        return EnsembleSpec(**{**spec_defaults(run_keys), **flags})
    except ValidationError as error:
        raise ConfigError("; ".join(_flag_message(item) for item in error.errors())) from None


def _flag_message(item: Any) -> str:
    """A pydantic error on an ensemble key, worded with its flag (--route-tokens, ...)."""
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["loc"]:
        flag = "--" + str(item["loc"][0]).replace("_", "-")
        return f"{flag}: {message}"
    key, sep, rest = message.partition(": ")
    if sep and key in ENSEMBLE_FLAGS:
        return f"--{key.replace('_', '-')}: {rest}"
    return message


# ----------------------------------------------------------------------------------------------
# Subcommands


def cmd_prepare(args: argparse.Namespace) -> None:
    from hdee.console import stdout_console
    from hdee.data.prepare import prepare_data
    from hdee.outputs import check_run_directory
    from hdee.rundir import run_lock, save_resolved_config
    from hdee.show import print_prepared

    config = _config(args)
    layout = RunLayout.of(config.run_dir)
    check_run_directory(layout, f"{args.config}: run_dir", args.overwrite)
    with run_lock(layout, "hdee prepare"):
        save_resolved_config(config, layout)
        summary = prepare_data(config, layout, progress=not args.quiet)
    statuses = {name: entry["status"] for name, entry in summary["corpora"].items()}
    print_prepared(config, layout, statuses, stdout_console())


def cmd_plan(args: argparse.Namespace) -> None:
    from hdee.console import stdout_console
    from hdee.pipeline import current_classes, training_manifests
    from hdee.plan import build_plan, check_plannable
    from hdee.show import print_plan

    config = _config(args)
    layout = RunLayout.of(config.run_dir)
    known_vocab_size = _known_vocab_size(config, layout, args.vocab_size)
    # Everything decidable from the config is checked before a hub tokenizer is fetched.
    check_plannable(config, known_vocab_size)
    vocab_size = known_vocab_size or _pretrained_vocab_size(config)
    plan = build_plan(
        config,
        vocab_size,
        classes=current_classes(layout.repeat(config.run.repeat), config),
        manifests=training_manifests(config, layout),
    )
    print_plan(plan, stdout_console(), layout)
    if args.json:
        print(plan.model_dump_json(indent=2))


def _known_vocab_size(config: ExperimentConfig, layout: Any, given: int | None) -> int | None:
    """The prepared tokenizer's size if there is one, else what prepare will produce where that
    is known without loading a pretrained tokenizer (None when it is not)."""
    if (layout.tokenizer / "tokenizer.json").is_file():
        from hdee.pipeline import prepared_vocab

        return prepared_vocab(layout)[0]
    if given is not None:
        return given
    if config.data.tokenizer.kind == "bpe":
        return config.data.tokenizer.vocab_size
    return None


def _pretrained_vocab_size(config: ExperimentConfig) -> int:
    from hdee.data import DataError
    from hdee.data.tokenizer import load_pretrained

    try:
        return len(load_pretrained(config.data.tokenizer.name_or_path))
    except DataError as error:
        raise DataError(
            f"{error}. The plan needs the vocabulary size for its FLOP counts: give it with "
            "--vocab-size N (128256 for Llama-3), or run `hdee prepare` first"
        ) from None


def cmd_train(args: argparse.Namespace) -> None:
    from hdee.train import main_train

    main_train(args.spec)


def cmd_jobs(args: argparse.Namespace) -> None:
    from hdee.outputs import check_run_directory
    from hdee.pipeline import write_stage_specs
    from hdee.rundir import run_lock

    config = _config(args)
    layout = RunLayout.of(config.run_dir)
    check_run_directory(layout, f"{args.config}: run_dir", args.overwrite)
    with run_lock(layout, "hdee jobs"):  # writes plan.json and the spec files
        listed = write_stage_specs(config, layout, args.stage)
    for job, spec_path in listed:
        print(job.job_id, job.iteration or 0, job.init_from or "-", spec_path)


def cmd_run(args: argparse.Namespace) -> None:
    config = _config(args)
    runner = _runner_from_flags(config, args)
    if runner is not None:
        config = config.model_copy(update={"runner": runner})
    if args.repeats is not None:
        # `hdee run` runs every repeat: the config's own run.repeat does not apply.
        config = config.model_copy(update={"run": RunConfig(repeats=args.repeats)})
    from hdee.outputs import check_run_directory
    from hdee.pipeline import run_experiment

    check_run_directory(RunLayout.of(config.run_dir), f"{args.config}: run_dir", args.overwrite)
    run_experiment(config, start=args.start, until=args.until, progress=not args.quiet)


def _runner_from_flags(config: ExperimentConfig, args: argparse.Namespace) -> Any:
    """The runner config after --runner / --address / --workers, or None when none is given.
    Switching kind keeps what both kinds share (gpus_per_job)."""
    from hdee.config import LocalRunnerConfig, RayRunnerConfig

    if not (args.runner or args.address or args.workers is not None):
        return None
    kind = args.runner or config.runner.kind
    shared = {"gpus_per_job": config.runner.gpus_per_job}
    if kind == "ray":
        if args.workers is not None:
            raise ConfigError(
                "--workers: the Ray runner schedules jobs by the cluster's resources; "
                "--workers is for --runner local (runner.cpus_per_job sizes Ray's jobs)"
            )
        keep = config.runner.model_dump() if config.runner.kind == "ray" else shared
        return RayRunnerConfig(
            **{**keep, "kind": "ray", "address": args.address or keep.get("address")}
        )
    if args.address:
        raise ConfigError("--address: a Ray cluster address, used with --runner ray only")
    keep = config.runner.model_dump() if config.runner.kind == "local" else shared
    workers = args.workers if args.workers is not None else keep.get("workers", 0)
    return LocalRunnerConfig(**{**keep, "kind": "local", "workers": workers})


def cmd_evaluate(args: argparse.Namespace) -> None:
    from hdee.evaluate import evaluate_run
    from hdee.pipeline import repeat_views
    from hdee.rundir import run_lock

    # The ensemble flags are evaluation keys: --prior X is --set evaluation.prior=X.
    flags = {f"evaluation.{key}": value for key, value in _ensemble_flags(args).items()}
    config = _run_config(args.run, args.set, "evaluate", extra_overrides=flags)
    layout = RunLayout.of(config.run_dir)
    with run_lock(layout, "hdee evaluate"):
        for repeat_config, repeat_layout in repeat_views(config, layout):
            evaluate_run(repeat_config, repeat_layout, progress=not args.quiet)


def cmd_report(args: argparse.Namespace) -> None:
    from hdee.report import write_report
    from hdee.rundir import run_lock

    config = _run_config(args.run, command="report")
    layout = RunLayout.of(config.run_dir)
    with run_lock(layout, "hdee report"):
        report = write_report(config, layout)
    print(report)


def cmd_generate(args: argparse.Namespace) -> None:
    from hdee.atomic import write_text
    from hdee.console import print_table, stderr_console
    from hdee.generate import continue_from_run, expert_usage, weights_jsonl
    from hdee.outputs import check_output_file, is_weights_jsonl

    layout = _existing_run(args.run)
    if args.weights_jsonl:
        check_output_file(args.weights_jsonl, "hdee generate", "--weights-jsonl", is_weights_jsonl)
    continuation = continue_from_run(
        layout,
        args.configuration,
        args.prompt,
        spec=_ensemble_spec(args, layout),
        max_new_tokens=args.max_new_tokens,
        greedy=args.temperature == 0,
        temperature=args.temperature or 1.0,
        top_k=args.top_k,
        seed=args.seed,
    )
    print(args.prompt + continuation.text)  # the continuation reads best after its prompt
    # Which experts produced it, on stderr so stdout stays the text alone.
    generation = continuation.generation
    routed = (
        f"routed to {len(generation.kept)} after {generation.routed_at} tokens"
        if generation.routed_at is not None
        else "every expert ran on every token"
    )
    rows = [
        [u["expert"], f"{u['mean_weight']:.3f}", str(u["tokens_run"]), "yes" if u["kept"] else "no"]
        for u in expert_usage(continuation)
    ]
    print_table(
        ["expert", "mean weight", "tokens run", "kept"],
        rows,
        title=f"experts ({routed})",
        right=["mean weight", "tokens run"],
        console=stderr_console(),
    )
    if args.weights_jsonl:
        check_output_file(args.weights_jsonl, "hdee generate", "--weights-jsonl", is_weights_jsonl)
        write_text(Path(args.weights_jsonl), weights_jsonl(continuation))


def cmd_export(args: argparse.Namespace) -> None:
    from hdee.export import export_ensemble
    from hdee.rundir import run_lock

    layout = _existing_run(args.run)
    spec = _ensemble_spec(args, layout)
    inside_run = Path(args.out).resolve().is_relative_to(Path(args.run).resolve())
    lock = run_lock(layout, "hdee export") if inside_run else nullcontext()
    with lock:
        out = export_ensemble(
            args.run, args.configuration, args.out, spec=spec, overwrite=args.overwrite
        )
    print(out)


def cmd_tasks(args: argparse.Namespace) -> None:
    from hdee.rundir import run_lock
    from hdee.tasks import run_tasks

    layout = _existing_run(args.run)
    spec = _ensemble_spec(args, layout)
    with run_lock(layout, "hdee tasks"):
        run_tasks(
            args.run,
            args.tasks,
            spec=spec,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )


def cmd_migrate(args: argparse.Namespace) -> None:
    from hdee.console import print_table, stdout_console
    from hdee.migrate import migrate_run

    layout = _existing_run(args.run)
    found = migrate_run(layout, dry_run=args.dry_run)
    outdated = [item for item in found if item.outdated]
    done = "would upgrade" if args.dry_run else "upgraded"
    rows = [
        [
            str(item.path.relative_to(layout.run_root)),
            item.format,
            f"{item.version} -> {item.current}" if item.outdated else str(item.version),
            done if item.outdated else "current",
        ]
        for item in found
    ]
    console = stdout_console()
    print_table(["record", "format", "version", "status"], rows, console=console)
    if outdated:
        print(f"{len(outdated)} of {len(found)} records {done} to hdee {__version__}'s versions")
    else:
        print(f"all {len(found)} records are hdee {__version__}'s versions: nothing to do")


def _parser_migrate(sub: Any) -> None:
    p = _subcommand(
        sub,
        "migrate",
        "Rewrite every record of a run directory that an older hdee wrote in this version's "
        "shape (atomically; nothing happens to a current run).",
        cmd_migrate,
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be upgraded; write nothing"
    )


def cmd_discover(args: argparse.Namespace) -> None:
    from hdee.console import stdout_console
    from hdee.discover import print_discovery
    from hdee.outputs import check_run_directory
    from hdee.pipeline import run_discovery

    config = _config(args)
    check_run_directory(RunLayout.of(config.run_dir), f"{args.config}: run_dir", args.overwrite)
    if config.data.discover is None:
        raise ConfigError(
            f"{args.config}: data.discover is not set: there is no corpus to discover domains "
            "in (see docs/discovery.md)"
        )
    # Prepare (and, for seed features, the seeds) first; what is done already is reused.
    print_discovery(run_discovery(config, progress=not args.quiet), stdout_console())


def _parser_discover(sub: Any) -> None:
    p = _subcommand(
        sub,
        "discover",
        "Discover domains in an unlabelled corpus (data.discover): cluster it and prepare each "
        "cluster as a domain cluster-00, cluster-01, ...; runs prepare first (and the seeds, "
        "for seed features). See docs/discovery.md.",
        cmd_discover,
    )
    _add_config(p)
    _add_quiet(p)
    _add_run_overwrite(p)


def cmd_demo(args: argparse.Namespace) -> None:
    from hdee.demo import run_demo

    run_demo(
        run_dir=Path(args.run_dir) if args.run_dir else None,
        quick=args.quick,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )


# ----------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdee",
        description="Heterogeneous Domain Expert Ensembles: prepare data, train seeds and "
        "domain experts under an equal compute budget, ensemble them with a domain posterior, "
        "and report per-domain perplexity.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hdee {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return parser


def _subcommand(sub: Any, name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=func)
    return p


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment config (YAML); see docs/config.md")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set plan.iterations=2 (repeatable)",
    )


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def _add_run_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help=RUN_OVERWRITE_HELP)


def _add_ensemble_flags(p: argparse.ArgumentParser, evaluate: bool = False) -> None:
    """The ensemble spec's flags (hdee.ensemble_spec), the same for every inference command.
    Unset, they keep the run's evaluation keys; see docs/evaluation.md."""
    group = p.add_argument_group(
        "ensemble",
        "which ensemble runs (default: the run's evaluation keys; docs/evaluation.md)",
    )
    group.add_argument(
        "--members",
        choices=["latest", "all"],
        help="latest: the newest expert of every lane; all: every expert of every lane and "
        "iteration (BTM's growing forest)",
    )
    if not evaluate:
        group.add_argument(
            "--iteration",
            type=_int_at_least(1),
            help="the ensemble after this iteration (default: the last)",
        )
    group.add_argument(
        "--exclude",
        action="extend",
        type=_names,
        metavar="NAME[,NAME...]",
        help="opt-out: withdraw members by name (lane, lane@k), job id or domain (every member "
        "trained on it or descended from one that was); their weights are never loaded",
    )
    group.add_argument(
        "--prior",
        type=_prior,
        metavar="uniform|cached|cached:DOMAIN|W,W,...",
        help="P(j): uniform (default), each evaluated domain's cached prior (evaluate only), the "
        "cached prior estimated on DOMAIN's validation text, or one weight per member",
    )
    group.add_argument("--posterior", choices=["prefix", "updating"])
    group.add_argument(
        "--routing",
        choices=["none", "prefix", "prior", "budget"],
        help="none (default), prefix (top K after --route-tokens), prior (top K of the prior), "
        "budget (the most posterior mass within --flop-budget); --experts K alone means prefix",
    )
    group.add_argument(
        "--experts",
        type=_ks,
        metavar="K[,K...]" if evaluate else "K",
        help="k: experts each sequence keeps after routing"
        + (" (several: the sweep)" if evaluate else ""),
    )
    group.add_argument(
        "--route-tokens",
        type=_int_at_least(1),
        metavar="N",
        help="tokens every expert reads before routing (default 32)",
    )
    group.add_argument(
        "--flop-budget",
        type=_finite_at_least(0.0),
        metavar="F",
        help="budget routing: forward FLOPs per token after routing",
    )


def _parser_prepare(sub: Any) -> None:
    p = _subcommand(
        sub, "prepare", "Tokenize, split and pack the general corpus and every domain.", cmd_prepare
    )
    _add_config(p)
    _add_quiet(p)
    _add_run_overwrite(p)


def _parser_plan(sub: Any) -> None:
    p = _subcommand(
        sub, "plan", "Print the jobs, lanes and compute budgets of an experiment.", cmd_plan
    )
    _add_config(p)
    p.add_argument("--json", action="store_true", help="also print the plan as JSON")
    p.add_argument(
        "--vocab-size",
        type=_int_at_least(1),
        help="vocabulary size to plan with before the data is prepared (default: the BPE's "
        "configured size, or the pretrained tokenizer's)",
    )


def _parser_train(sub: Any) -> None:
    p = _subcommand(
        sub,
        "train",
        "Run one training job (seed or expert) from a spec file; works under "
        "torchrun for DDP; re-running resumes.",
        cmd_train,
    )
    p.add_argument("spec", help="TrainSpec JSON (a run writes one per job: RUN/jobs/ID/spec.json)")


def _parser_jobs(sub: Any) -> None:
    p = _subcommand(
        sub,
        "jobs",
        "Write the spec files of a training stage's jobs and list them, parents first, one per "
        "line: JOB_ID ITERATION PARENT_JOB_ID SPEC_PATH (for running jobs with an external "
        "scheduler such as SLURM; see docs/scaling.md).",
        cmd_jobs,
    )
    _add_config(p)
    p.add_argument(
        "stage", choices=["seeds", "experts"], help="seeds (after prepare) or experts (after plan)"
    )
    _add_run_overwrite(p)


def _parser_run(sub: Any) -> None:
    p = _subcommand(
        sub, "run", "Run every stage into the run directory; running it again resumes.", cmd_run
    )
    _add_config(p)
    p.add_argument("--from", dest="start", choices=STAGES, help="first stage to run")
    p.add_argument("--until", choices=STAGES, help="last stage to run")
    p.add_argument("--runner", choices=["local", "ray"], help="where jobs run (default: config)")
    p.add_argument("--address", help="Ray cluster address (with --runner ray)")
    p.add_argument("--workers", type=_int_at_least(0), help="concurrent jobs (0: automatic)")
    p.add_argument(
        "--repeats",
        type=_int_at_least(1),
        help="run the experiment N times with training seeds seed..seed+N-1 on the same "
        "prepared data (default: the config's run.repeats)",
    )
    _add_quiet(p)
    _add_run_overwrite(p)


def _parser_evaluate(sub: Any) -> None:
    p = _subcommand(
        sub,
        "evaluate",
        "Test perplexity of every configuration, domain and ensembling method (of every repeat).",
        cmd_evaluate,
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override an evaluation key, e.g. --set evaluation.posterior=updating",
    )
    _add_ensemble_flags(p, evaluate=True)
    _add_quiet(p)


def _parser_report(sub: Any) -> None:
    p = _subcommand(sub, "report", "Write the Markdown report, CSV and plots of a run.", cmd_report)
    p.add_argument("run", help="run directory")


def _parser_generate(sub: Any) -> None:
    p = _subcommand(sub, "generate", "Generate text from a configuration's ensemble.", cmd_generate)
    p.add_argument("run", help="run directory")
    p.add_argument("--configuration", required=True, help="e.g. MHe-IHo")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--max-new-tokens",
        type=_int_at_least(1),
        default=None,
        help="new tokens to generate (default: 50, or fewer where the experts' context of "
        "data.seq_len positions ends first; more than the context allows is refused)",
    )
    p.add_argument(
        "--temperature", type=_finite_at_least(0.0), default=0.0, help="0: greedy (default)"
    )
    p.add_argument(
        "--top-k", type=_int_at_least(1), default=None, help="sample from the k likeliest tokens"
    )
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument(
        "--weights-jsonl",
        metavar="PATH",
        help="write the ensemble's resolved spec, then each new token's expert weights "
        "P(j | x_<t), as JSON lines to PATH (a new file, or one an earlier --weights-jsonl "
        "wrote; hdee never replaces another file)",
    )
    _add_ensemble_flags(p)


def _parser_export(sub: Any) -> None:
    p = _subcommand(
        sub,
        "export",
        "Write a configuration's ensemble as a transformers model directory (loads with "
        "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)); see docs/export.md.",
        cmd_export,
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "out",
        help="the model directory to write: new, empty, or an earlier export (whose files are "
        "replaced; files added beside them stay)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write OUT even when it is a non-empty directory no export wrote: the export's "
        "files go beside what is there; nothing in it is removed or replaced (docs/cli.md)",
    )
    p.add_argument("--configuration", required=True, help="e.g. MHe-IHo")
    _add_ensemble_flags(p)


def _parser_tasks(sub: Any) -> None:
    p = _subcommand(
        sub,
        "tasks",
        "Downstream tasks with lm-evaluation-harness on every configuration's ensemble and "
        "each single expert (needs hdee[tasks]); results in RUN/tasks/results.json.",
        cmd_tasks,
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--tasks",
        required=True,
        metavar="NAME[,NAME...]|PATH.yaml|builtin",
        help="harness task names, task YAML files, or 'builtin' (next-chunk choice and cloze "
        "built from the run's own test text)",
    )
    p.add_argument(
        "--limit", type=_int_at_least(1), default=None, help="at most N (>= 1) documents per task"
    )
    p.add_argument(
        "--num-fewshot",
        type=_int_at_least(0),
        default=None,
        help="few-shot examples per prompt (>= 0; default: each task's own)",
    )
    p.add_argument(
        "--batch-size", type=_int_at_least(1), default=8, help="continuations scored per forward"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_ensemble_flags(p)


def _parser_demo(sub: Any) -> None:
    p = _subcommand(
        sub,
        "demo",
        "The built-in experiment: real text from this machine, tiny models, a CPU.",
        cmd_demo,
    )
    p.add_argument("--quick", action="store_true", help="a smaller variant (about 2 minutes)")
    p.add_argument("--run-dir", help="where to put it (default: runs/demo or runs/demo-quick)")
    _add_quiet(p)
    _add_run_overwrite(p)


SUBCOMMANDS = (
    _parser_prepare,
    _parser_discover,
    _parser_plan,
    _parser_train,
    _parser_jobs,
    _parser_run,
    _parser_evaluate,
    _parser_report,
    _parser_generate,
    _parser_export,
    _parser_tasks,
    _parser_migrate,
    _parser_demo,
)


def _int_at_least(minimum: int) -> Any:
    """An argparse type: an integer >= minimum (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _finite_at_least(minimum: float) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum:g}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _prior(text: str) -> str:
    """The prior's grammar (hdee.ensemble_spec.parse_prior), checked before anything loads."""
    from hdee.ensemble_spec import parse_prior

    try:
        return str(parse_prior(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected NAME[,NAME...], got {text!r}")
    return names


def _ks(text: str) -> list[int]:
    """K or K,K,...: integers >= 1."""
    parse = _int_at_least(1)
    return [parse(part.strip()) for part in text.split(",")]


# Flags whose value may start with "-" (a negative weight): argparse would take "-1,1,1" for an
# option and say "expected one argument"; joined as --prior=-1,1,1 the value reaches the check.
VALUE_FLAGS = ("--prior", "--exclude")


def _joined_values(argv: list[str]) -> list[str]:
    joined: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in VALUE_FLAGS and index + 1 < len(argv) and argv[index + 1].startswith("-"):
            joined.append(f"{token}={argv[index + 1]}")
            index += 2
            continue
        joined.append(token)
        index += 1
    return joined


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_joined_values(list(sys.argv[1:] if argv is None else argv)))
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so worker processes are stopped
    # rather than orphaned; what finished is kept and the same command resumes.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _dispatch(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        from hdee.console import progress_setting

        progress_setting()  # a mistyped HDEE_PROGRESS fails now, not after hours of work
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, RuntimeError, OSError, ImportError) as error:
        # Expected failures (bad input, a failed job) get one clear message, not a traceback;
        # HDEE_DEBUG=1 shows the traceback too.
        if os.environ.get("HDEE_DEBUG"):
            raise
        print(f"hdee {args.command}: error: {_describe(error, args)}", file=sys.stderr)
        # The exit-code rule (docs/cli.md): 2 when the command line or the config is wrong,
        # 1 when a command failed while running.
        return 2 if _is_config_error(error) or isinstance(error, UsageError) else 1
    return 0


def _is_config_error(error: BaseException) -> bool:
    # A plan that cannot be made is a config to change, as is a config that does not validate.
    from hdee.ensemble_spec import SpecError
    from hdee.plan import PlanError

    return isinstance(error, (ConfigError, PlanError, SpecError))


def _describe(error: BaseException, args: argparse.Namespace) -> str:
    """The error's message, with the config file named where the message lacks it (a plan
    error names the key only)."""
    config_path = getattr(args, "config", None)
    if config_path is None and getattr(args, "run", None):
        config_path = str(RunLayout.of(args.run).config)
    from hdee.ensemble_spec import SpecError

    message = str(error)
    # A flag's or an ensemble spec's error is about the command line, not the config file.
    about_arguments = isinstance(error, SpecError) or message.startswith("--")
    if _is_config_error(error) and config_path and not about_arguments:
        if not message.startswith(str(config_path)):
            message = f"{config_path}: {message}"
    return message


if __name__ == "__main__":
    sys.exit(main())
