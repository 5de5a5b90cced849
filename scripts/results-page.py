"""Regenerate a results page (docs/results.md by default) from finished runs with the current
code: each run's report is re-rendered from its records, and with --evaluate every repeat is
re-evaluated first (cheap: the log-prob cache holds the experts' scores).

    python scripts/results-page.py runs/scale-study/h32 runs/scale-study/h64 runs/scale-study/h128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hdee.errors import UsageError
from hdee.scale_study import write_results_page

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--evaluate", action="store_true", help="re-evaluate every repeat first")
    args = parser.parse_args(argv)
    try:
        page = write_results_page(args.runs, args.output, evaluate=args.evaluate)
    except UsageError as error:
        print(f"results-page: {error}", file=sys.stderr)
        return 2
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
