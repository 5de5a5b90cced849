"""`hdee demo`: the whole HDEE experiment on real text from this machine, with tiny models.

Gathers the built-in corpus (demo_corpus.py: text shipped by Debian and Python packages),
writes an ordinary experiment config for it into the run directory, and runs every stage with
the same `run_experiment` that `hdee run` uses. Running it again resumes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml
from rich.console import Console

from hdee.atomic import read_json, write_text
from hdee.config import ExperimentConfig, parse_config
from hdee.console import section, status, stderr_console
from hdee.demo_corpus import demo_config as corpus_config
from hdee.demo_corpus import gather_demo_corpus
from hdee.layout import RunLayout
from hdee.outputs import check_run_directory
from hdee.pipeline import run_experiment

# Documents per built-in task scored in the demo (each configuration's ensemble and each of its
# experts answers every one): enough for an accuracy to mean something, minutes on a CPU.
DEMO_TASK_LIMIT = {True: 48, False: 160}
CORPUS_DIR = "corpus"
CONFIG_FILE = "demo.yaml"
CONFIG_HEADER = "# The config `hdee demo` made for its corpus; `hdee run` accepts it as it is.\n"


def default_run_dir(quick: bool) -> Path:
    return Path("runs") / ("demo-quick" if quick else "demo")


def run_demo(
    run_dir: Path | None = None,
    quick: bool = False,
    progress: bool = True,
    console: Console | None = None,
    overwrite: bool = False,
) -> RunLayout:
    """Gather the corpus (once), write RUN/demo.yaml, and run (or resume) the experiment.
    `run_dir` must be new, empty or an earlier demo or run (or `overwrite`: hdee.outputs)."""
    console = console or stderr_console()
    run_dir = (run_dir or default_run_dir(quick)).resolve()
    ours = {CORPUS_DIR: None, CONFIG_FILE: CONFIG_HEADER}
    check_run_directory(RunLayout.of(run_dir), "--run-dir", overwrite, extra=ours)
    corpus_dir = run_dir / CORPUS_DIR
    config_path = run_dir / CONFIG_FILE
    description = corpus_dir / "corpus.json"
    # A corpus already gathered for this variant is reused as it is: gathering again would
    # rewrite identical files with new mtimes and make `prepare` redo its work.
    reuse = (
        config_path.is_file()
        and description.is_file()
        and read_json(description).get("quick") == quick
    )
    if not reuse:
        section("demo corpus", console)
        corpus = gather_demo_corpus(corpus_dir, quick=quick)
        console.print(corpus.summary())
        write_text(
            config_path,
            CONFIG_HEADER + yaml.safe_dump(corpus_config(corpus, run_dir, quick), sort_keys=False),
        )
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config = parse_config(raw, config_path)
    layout = run_experiment(config, progress=progress, console=console)
    run_builtin_tasks(config, layout, quick, progress, console)
    report = layout.report_markdown
    console.print(f"\n[bold]Demo finished.[/] Report: {report}")
    console.print(f"Config: {config_path}  (re-run with `hdee run {config_path}`)")
    return layout


def run_builtin_tasks(
    config: ExperimentConfig, layout: RunLayout, quick: bool, progress: bool, console: Console
) -> None:
    """Downstream accuracy on the two built-in tasks made from the demo's own test text (next
    chunk among four, cloze), then the report again with their table beside the perplexities.
    Skipped, with a note, where lm-evaluation-harness is not installed (`hdee[tasks]`)."""
    if importlib.util.find_spec("lm_eval") is None:
        status("downstream tasks skipped: pip install 'hdee[tasks]' to add them", console)
        return
    from hdee.report import write_report
    from hdee.tasks import run_tasks

    section("tasks", console)
    run_tasks(layout.root, "builtin", limit=DEMO_TASK_LIMIT[quick], progress=False)
    write_report(config, layout)
