"""Write the run-directory fixture of this hdee release: tests/fixtures/runs/<version>/.

    make fixture                                  # or: python scripts/make-fixture-run.py
    python scripts/make-fixture-run.py --overwrite   # replace this version's fixture

A release adds its fixture (docs/releasing.md) and keeps every earlier one: each later version
must still read that run's records, evaluate it to the same perplexities, export it and resume
it for one more iteration (tests/test_fixture_runs.py runs those checks on every fixture).

The run is the tiniest that goes through every stage up to evaluate with the real `hdee run`
command: the suite's generated corpus (tests/conftest.py), seven domains (one held out), one
iteration of two that the trainable domains allow, a homogeneous and a heterogeneous (S / M / L) configuration, models of hidden size
32. What is kept is what a later version must read: the resolved config, the records
(plan, difficulty, job results, evaluation results), the prepared data (tokenizer, token
arrays and manifests, which evaluate and further training read), and each job's spec, metrics
and final model (an HF directory: config.json + model.safetensors). Rebuilt caches (the
evaluation's cached log-probs), step checkpoints, TensorBoard files, logs, plots and the
report are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "runs"

# Top-level entries of the run directory that are kept (anything else hdee wrote is rebuilt
# on demand or is for people: the report, the lock).
KEEP_TOP = ("config.yaml", "plan.json", "data", "difficulty", "jobs", "evaluation")
# Inside a job directory: what reading, evaluating and branching from a finished job need.
KEEP_JOB = ("spec.json", "result.json", "metrics.jsonl", "final")
# Plots and caches that later versions rebuild (or never read).
DROP_NAMES = ("difficulty.png", "logprobs", "results.csv")


def fixture_config(workdir: Path) -> dict:
    """The fixture's experiment: the suite's tiny run config, cut to the fewest jobs that still
    cover every stage and three model sizes."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_run_config  # the corpus and settings the suite trains on

    raw = tiny_run_config(workdir)
    # Two trainable domains per class: one iteration is trained, the second is what a later
    # version resumes the run into (plan.iterations: 2 on a copy).
    raw["data"]["domains"] = raw["data"]["domains"][:7]
    raw["plan"]["held_out"] = ["d6"]
    raw["plan"]["iterations"] = 1
    raw["plan"]["configurations"] = [
        c for c in raw["plan"]["configurations"] if c["name"] in ("MHo-IHo", "MHe-IHo")
    ]
    raw["model"] = {"preset": "tiny", "hidden_size": 32, "num_heads": 2}
    raw["evaluation"].update(
        {"max_test_sequences": 4, "cached_prior_sequences": 2, "bootstrap_resamples": 200}
    )
    return raw


def copy_kept(run: Path, target: Path) -> None:
    """Copy the kept part of the finished run `run` into `target` (a new directory)."""

    def ignore(directory: str, names: list[str]) -> list[str]:
        here = Path(directory)
        if here == run:
            return [n for n in names if n not in KEEP_TOP]
        if here.parent == run / "jobs":
            return [n for n in names if n not in KEEP_JOB]
        return [n for n in names if n in DROP_NAMES or n.startswith(".")]

    shutil.copytree(run, target, ignore=ignore)


def hdee(*argv: str) -> None:
    from hdee.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    if code != 0:
        raise SystemExit(f"hdee {' '.join(argv)} exited {code}:\n{err.getvalue()}")


def main() -> int:
    from hdee import __version__

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--overwrite", action="store_true", help="replace this version's fixture")
    parser.add_argument("--into", type=Path, default=FIXTURES, help="the fixtures directory")
    args = parser.parse_args()
    target = args.into / __version__
    if target.exists() and not args.overwrite:
        print(f"{target} exists: a released fixture is never rewritten (--overwrite to replace)")
        return 2
    with tempfile.TemporaryDirectory(prefix="hdee-fixture-") as tmp:
        workdir = Path(tmp)
        config = workdir / "experiment.yaml"
        config.write_text(yaml.safe_dump(fixture_config(workdir)), encoding="utf-8")
        hdee("run", str(config), "--until", "evaluate", "--quiet")
        staged = args.into / f".{__version__}.tmp"
        shutil.rmtree(staged, ignore_errors=True)
        copy_kept(workdir / "run", staged)
    if target.exists():
        shutil.rmtree(target)
    staged.rename(target)
    files = [path for path in sorted(target.rglob("*")) if path.is_file()]
    size = sum(path.stat().st_size for path in files)
    print(f"{target}: {len(files)} files, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
