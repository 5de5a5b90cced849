"""The scale study in one command: gather the demo corpus (once), run every config of
configs/scale-study/ (each resumes where it stopped), then regenerate docs/results.md from the
finished runs with the current code (scripts/results-page.py does only that last step).

    python scripts/scale-study.py                 # what `make scale-study` runs
    python scripts/scale-study.py --page-only     # the page from runs already finished
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hdee.config import load_config
from hdee.console import stderr_console
from hdee.demo_corpus import gather_demo_corpus
from hdee.pipeline import run_experiment
from hdee.scale_study import write_results_page

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs" / "scale-study").glob("*.yaml"))
CORPUS = ROOT / "runs" / "scale-study" / "corpus"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page-only", action="store_true", help="no training: only the page")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or lines")
    args = parser.parse_args(argv)
    console = stderr_console()
    if not args.page_only:
        if not (CORPUS / "corpus.json").is_file():
            console.print(gather_demo_corpus(CORPUS).summary())
        for path in CONFIGS:
            console.print(f"== scale study: {path.name} ==")
            run_experiment(load_config(path), progress=not args.quiet, console=console)
    runs = [load_config(path).run_dir for path in CONFIGS]
    page = write_results_page(runs, args.page, evaluate=args.page_only)
    console.print(f"Wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
