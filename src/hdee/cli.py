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
from hdee.config import STAGES, ConfigError, ExperimentConfig, RunConfig, load_config
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

environment:
  HDEE_PROGRESS=auto|1|plain|0   progress: a live bar on a terminal and plain lines otherwise
                                 (auto, the default), always a bar (1), always plain lines
                                 (plain), none (0; a command's --quiet is the same)
  HDEE_DEBUG=1                   show the traceback of an error too
"""

QUIET_HELP = "no progress bars or lines (the same as HDEE_PROGRESS=0)"


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
    run_dir: str, extra: list[str] | None = None, command: str = "evaluate"
) -> ExperimentConfig:
    """The resolved config a run directory holds (its run_dir pointed at where it is now).
    `extra` (--set) may change evaluation settings only."""
    path = _existing_run(run_dir).config
    changes = _overrides(extra, command, sections=("evaluation",))
    return load_config(path, overrides={"run_dir": str(Path(run_dir).resolve()), **changes})


# ----------------------------------------------------------------------------------------------
# Subcommands


def cmd_prepare(args: argparse.Namespace) -> None:
    from hdee.console import stdout_console
    from hdee.data.prepare import prepare_data
    from hdee.rundir import run_lock, save_resolved_config
    from hdee.show import print_prepared

    config = _config(args)
    layout = RunLayout.of(config.run_dir)
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
        classes=current_classes(layout.repeat(config.run.repeat)),
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
    from hdee.pipeline import write_stage_specs
    from hdee.rundir import run_lock

    config = _config(args)
    layout = RunLayout.of(config.run_dir)
    with run_lock(layout, "hdee jobs"):  # writes plan.json and the spec files
        listed = write_stage_specs(config, layout, args.stage)
    for job, spec_path in listed:
        print(job.job_id, job.iteration or 0, job.init_from or "-", spec_path)


def cmd_run(args: argparse.Namespace) -> None:
    config = _config(args)
    runner_updates: dict[str, Any] = {}
    if args.runner:
        runner_updates["kind"] = args.runner
    if args.address:
        runner_updates["address"] = args.address
    if args.workers is not None:
        runner_updates["workers"] = args.workers
    if runner_updates:
        config = config.model_copy(
            update={"runner": config.runner.model_copy(update=runner_updates)}
        )
    if args.repeats is not None:
        # `hdee run` runs every repeat: the config's own run.repeat does not apply.
        config = config.model_copy(update={"run": RunConfig(repeats=args.repeats)})
    from hdee.pipeline import run_experiment

    run_experiment(config, start=args.start, until=args.until, progress=not args.quiet)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from hdee.evaluate import evaluate_run
    from hdee.pipeline import repeat_views
    from hdee.rundir import run_lock

    config = _run_config(args.run, args.set, "evaluate")
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

    continuation = continue_from_run(
        RunLayout.of(args.run),
        args.configuration,
        args.prompt,
        iteration=args.iteration,
        members=args.members,
        max_new_tokens=args.max_new_tokens,
        greedy=args.temperature == 0,
        temperature=args.temperature or 1.0,
        top_k=args.top_k,
        seed=args.seed,
        posterior=args.posterior,
        prior=args.prior,
        prior_domain=args.prior_domain,
        routed_experts=args.experts,
        route_tokens=args.route_tokens,
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
        write_text(Path(args.weights_jsonl), weights_jsonl(continuation))


def cmd_export(args: argparse.Namespace) -> None:
    from hdee.export import export_ensemble
    from hdee.rundir import run_lock

    inside_run = Path(args.out).resolve().is_relative_to(Path(args.run).resolve())
    lock = run_lock(_existing_run(args.run), "hdee export") if inside_run else nullcontext()
    with lock:
        out = export_ensemble(
            args.run,
            args.configuration,
            args.out,
            iteration=args.iteration,
            members=args.members,
            prior=args.prior,
            posterior=args.posterior,
            experts=args.experts,
            route_tokens=args.route_tokens,
        )
    print(out)


def cmd_tasks(args: argparse.Namespace) -> None:
    from hdee.rundir import run_lock
    from hdee.tasks import run_tasks

    with run_lock(_existing_run(args.run), "hdee tasks"):
        run_tasks(
            args.run,
            args.tasks,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )


def cmd_discover(args: argparse.Namespace) -> None:
    from hdee.console import stdout_console
    from hdee.discover import print_discovery
    from hdee.pipeline import run_discovery

    config = _config(args)
    if config.data.discover is None:
        raise ConfigError(
            f"{args.config}: data.discover is not set: there is no corpus to discover domains "
            "in (see docs/discovery.md)"
        )
    # Prepare (and, for seed features, the seeds) first; what is done already is reused.
    print_discovery(run_discovery(config, progress=not args.quiet), stdout_console())


def _add_discover_parser(sub: Any) -> None:
    text = (
        "Discover domains in an unlabelled corpus (data.discover): cluster it and prepare each "
        "cluster as a domain cluster-00, cluster-01, ...; runs prepare first (and the seeds, "
        "for seed features). See docs/discovery.md."
    )
    p = sub.add_parser("discover", help=text, description=text)
    p.set_defaults(func=cmd_discover)
    p.add_argument("config", help="experiment config (YAML) with data.discover")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.discover.clusters=8 (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def cmd_demo(args: argparse.Namespace) -> None:
    from hdee.demo import run_demo

    run_demo(
        run_dir=Path(args.run_dir) if args.run_dir else None,
        quick=args.quick,
        progress=not args.quiet,
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

    def add(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="experiment config (YAML); see docs/config.md")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set plan.iterations=2 (repeatable)",
        )

    p = add("prepare", "Tokenize, split and pack the general corpus and every domain.", cmd_prepare)
    add_config(p)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    p = add("plan", "Print the jobs, lanes and compute budgets of an experiment.", cmd_plan)
    add_config(p)
    p.add_argument("--json", action="store_true", help="also print the plan as JSON")
    p.add_argument(
        "--vocab-size",
        type=_int_at_least(1),
        help="vocabulary size to plan with before the data is prepared (default: the BPE's "
        "configured size, or the pretrained tokenizer's)",
    )

    _add_discover_parser(sub)

    p = add(
        "train",
        "Run one training job (seed or expert) from a spec file; works under "
        "torchrun for DDP; re-running resumes.",
        cmd_train,
    )
    p.add_argument("spec", help="TrainSpec JSON (a run writes one per job: RUN/jobs/ID/spec.json)")

    p = add(
        "jobs",
        "Write the spec files of a training stage's jobs and list them, parents first, one per "
        "line: JOB_ID ITERATION PARENT_JOB_ID SPEC_PATH (for running jobs with an external "
        "scheduler such as SLURM; see docs/scaling.md).",
        cmd_jobs,
    )
    add_config(p)
    p.add_argument(
        "stage", choices=["seeds", "experts"], help="seeds (after prepare) or experts (after plan)"
    )

    p = add("run", "Run every stage into the run directory; running it again resumes.", cmd_run)
    add_config(p)
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
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    p = add(
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
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    p = add("report", "Write the Markdown report, CSV and plots of a run.", cmd_report)
    p.add_argument("run", help="run directory")

    p = add("generate", "Generate text from a configuration's final ensemble.", cmd_generate)
    p.add_argument("run", help="run directory")
    p.add_argument("--configuration", required=True, help="e.g. MHe-IHo")
    p.add_argument(
        "--iteration",
        type=_int_at_least(1),
        default=None,
        help="the ensemble after this iteration (default: last)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=50)
    p.add_argument(
        "--temperature", type=_finite_at_least(0.0), default=0.0, help="0: greedy (default)"
    )
    p.add_argument(
        "--top-k", type=_int_at_least(1), default=None, help="sample from the k likeliest tokens"
    )
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--posterior", choices=["prefix", "updating"], default="prefix")
    p.add_argument(
        "--members",
        choices=["latest", "all"],
        default="latest",
        help="latest: the newest expert of every lane; all: every expert of every lane and "
        "iteration (BTM's growing forest)",
    )
    p.add_argument(
        "--experts",
        type=_int_at_least(1),
        default=None,
        metavar="K",
        help="route: after --route-tokens tokens keep only the K experts with the highest "
        "posterior (the others never run again); default: every expert",
    )
    p.add_argument(
        "--route-tokens",
        type=_int_at_least(1),
        default=32,
        metavar="N",
        help="tokens (prompt first) every expert reads before routing to --experts (default 32)",
    )
    p.add_argument(
        "--weights-jsonl",
        metavar="PATH",
        help="write each new token's expert weights P(j | x_<t) as JSON lines to PATH",
    )
    prior = p.add_mutually_exclusive_group()
    prior.add_argument(
        "--prior-domain",
        metavar="DOMAIN",
        help="weight the experts by the cached prior `hdee evaluate` estimated on this domain "
        "(default: uniform)",
    )
    prior.add_argument(
        "--prior",
        type=_weights,
        metavar="W,W,...",
        help="explicit prior weights, one per expert in the plan's lane order",
    )

    p = add(
        "export",
        "Write a configuration's ensemble as a transformers model directory (loads with "
        "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)); see docs/export.md.",
        cmd_export,
    )
    p.add_argument("run", help="run directory")
    p.add_argument("out", help="the model directory to write (replaced if it exists)")
    p.add_argument("--configuration", required=True, help="e.g. MHe-IHo")
    p.add_argument(
        "--iteration", type=int, default=None, help="after this iteration (default: last)"
    )
    p.add_argument(
        "--members",
        choices=["latest", "all"],
        default="latest",
        help="latest: the newest expert of every lane; all: every expert of every lane and "
        "iteration up to --iteration (BTM's growing forest)",
    )
    p.add_argument(
        "--prior",
        default="uniform",
        metavar="uniform|DOMAIN|W,W,...",
        help="P(j): uniform (default), the cached prior `hdee evaluate` estimated on DOMAIN's "
        "validation text, or one weight per member",
    )
    p.add_argument("--posterior", choices=["prefix", "updating"], default="prefix")
    p.add_argument(
        "--experts",
        type=int,
        default=None,
        metavar="K",
        help="route (the exported model does it itself): after --route-tokens tokens each "
        "sequence keeps only the K experts with the highest posterior (default: all mix)",
    )
    p.add_argument(
        "--route-tokens",
        type=int,
        default=32,
        metavar="N",
        help="tokens every expert reads before routing to --experts (default 32)",
    )

    p = add(
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
    p.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="continuations scored per forward")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = add(
        "demo",
        "The built-in experiment: real text from this machine, tiny models, a CPU.",
        cmd_demo,
    )
    p.add_argument("--quick", action="store_true", help="a smaller variant (about 2 minutes)")
    p.add_argument("--run-dir", help="where to put it (default: runs/demo or runs/demo-quick)")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return parser


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


def _weights(text: str) -> list[float]:
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not all(math.isfinite(w) for w in weights):
        raise argparse.ArgumentTypeError(f"weights must be finite numbers: {text!r}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"weights must be non-negative, not all 0: {text!r}")
    return weights


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        return 2 if _is_config_error(error) else 1
    return 0


def _is_config_error(error: BaseException) -> bool:
    # A plan that cannot be made is a config to change, as is a config that does not validate.
    from hdee.plan import PlanError

    return isinstance(error, (ConfigError, PlanError))


def _describe(error: BaseException, args: argparse.Namespace) -> str:
    """The error's message, with the config file named where the message lacks it (a plan
    error names the key only)."""
    config_path = getattr(args, "config", None)
    if config_path is None and getattr(args, "run", None):
        config_path = str(RunLayout.of(args.run).config)
    message = str(error)
    if _is_config_error(error) and config_path and not message.startswith(str(config_path)):
        message = f"{config_path}: {message}"
    return message


if __name__ == "__main__":
    sys.exit(main())
