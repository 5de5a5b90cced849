"""The numbers in report.md: the perplexity tables hold results.json's values, bold marks each
row's best, the geometric-mean rows and the win count equal a computation by hand.

Reads the shared run `tiny_cli_run` (conftest.py), and a copy of it whose results.json is
rewritten with chosen numbers (a baseline win, a tie, heterogeneous wins) before `hdee report`.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from pathlib import Path
from typing import Any

from hdee.atomic import read_json, write_json
from hdee.cli import main

HEADLINE = "uniform_prior"
TITLES = {
    "uniform_prior": "domain posterior, uniform prior",
    "cached_prior": "domain posterior, cached prior",
    "simple_average": "simple average of probabilities",
    "best_single": "best single expert",
}


def report(run_dir: Path) -> str:
    """`hdee report RUN`, then the Markdown it wrote."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(run_dir)]) == 0
    return Path(out.getvalue().strip()).read_text()


def table_after(markdown: str, heading: str) -> list[list[str]]:
    """Cells of the first Markdown table after `heading`, header row first."""
    lines = markdown.splitlines()
    start = lines.index(heading) + 1
    while not lines[start].startswith("|"):
        start += 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [rows[0], *rows[2:]]  # without the alignment row


def final(results: dict[str, Any], method: str) -> dict[str, dict[str, float]]:
    out = {}
    for name, configuration in results["configurations"].items():
        domains = configuration["iterations"][str(configuration["final_iteration"])]["domains"]
        out[name] = {d: e["methods"][method]["perplexity"] for d, e in domains.items()}
    return out


def best_by_hand(row: dict[str, float], baseline: str) -> str:
    winner = min(row, key=row.__getitem__)
    return baseline if row[baseline] <= row[winner] * 1.0001 else winner


MARGIN = 0.005  # evaluation.min_effect's default


def candidate_verdict(p: dict[str, float]) -> str:
    """The candidate's verdict: win / loss beyond the margin, equivalent within it."""
    low, high = math.expm1(p["low"]), math.expm1(p["high"])
    if high < -MARGIN:
        return "win"
    if low > MARGIN:
        return "loss"
    return "equivalent" if -MARGIN <= low and high <= MARGIN else "undecided"


def verdict_by_hand(pairs: dict, name: str, other: str) -> str:
    if (other, name) in pairs:
        return candidate_verdict(pairs[(other, name)])
    verdict = candidate_verdict(pairs[(name, other)])
    return {"win": "loss", "loss": "win"}.get(verdict, verdict)


def result_by_hand(results: dict[str, Any], domain: str, names: list[str]) -> tuple[str, str]:
    """(the winner or '', the result cell) by the rule of docs/evaluation.md."""
    pairs = {
        (p["reference"], p["candidate"]): p
        for p in results["uncertainty"]["configurations"]
        if p["domain"] == domain and p["method"] == HEADLINE
    }
    for name in names:
        if all(verdict_by_hand(pairs, name, o) == "win" for o in names if o != name):
            return name, f"win: {name}"

    def log_ppl(name: str) -> float:
        first = names[0]
        if name == first:
            return 0.0
        return pairs[(first, name)]["delta"]

    leader = min(names, key=log_ppl)
    group = [n for n in names if n == leader or verdict_by_hand(pairs, leader, n) != "win"]
    kinds = {verdict_by_hand(pairs, leader, n) for n in group if n != leader}
    verdict = "equivalent" if kinds == {"equivalent"} else "undecided"
    return "", f"tied best ({verdict}): {', '.join(group)}"


def check_report(markdown: str, results: dict[str, Any], plan: dict[str, Any]) -> None:
    baseline = plan["baseline"]
    table = final(results, HEADLINE)
    names = list(results["configurations"])
    with_intervals = "uncertainty" in results
    wins = {"trained": 0, "held_out": 0}
    ties = 0
    for heading, kind in (("## Trained domains", "trained"), ("## Held-out domains", "held_out")):
        header, *rows = table_after(markdown, heading)
        assert header == ["domain", "class", *names] + (["result"] if with_intervals else [])
        assert [row[0] for row in rows] == plan[f"{kind}_domains"]
        for domain, _, *cells in rows:
            values = {name: table[name][domain] for name in names}
            if with_intervals:
                best, cell = result_by_hand(results, domain, names)
                assert cells.pop() == cell
                ties += not best
                wins[kind] += best not in ("", baseline)
            else:
                best = best_by_hand(values, baseline)
                wins[kind] += best != baseline
            for name, cell in zip(names, cells, strict=True):
                text = f"{values[name]:.2f}"
                assert cell == (f"**{text}**" if name == best else text), (domain, name, cell)
    trained, held_out = len(plan["trained_domains"]), len(plan["held_out_domains"])
    total = wins["trained"] + wins["held_out"]
    if with_intervals:
        assert (
            f"**A heterogeneous configuration wins {total} of {trained + held_out} domains, the "
            f"baseline {baseline} wins {trained + held_out - total - ties}; "
        ) in markdown
        assert f"({wins['trained']} of {trained} trained domains won by a heterogeneous" in markdown
    else:
        assert (
            f"**A heterogeneous configuration has the lowest perplexity in {total} of "
            f"{trained + held_out} domains** ({wins['trained']} of {trained} trained, "
            f"{wins['held_out']} of {held_out} held out; baseline {baseline}, method: "
            f"{TITLES[HEADLINE]})"
        ) in markdown

    header, *rows = table_after(
        markdown, "## Every method (geometric mean of perplexity over domains)"
    )
    assert header == ["method", *names]
    by_title = {row[0]: row[1:] for row in rows}
    assert set(by_title) == set(TITLES.values())  # every method was evaluated
    for method, title in TITLES.items():
        per = final(results, method)
        expected = [
            f"{math.exp(sum(math.log(v) for v in per[n].values()) / len(per[n])):.2f}"
            for n in names
        ]
        assert by_title[title] == expected, method


def test_report_tables_hold_the_results_numbers(tiny_cli_run):
    run_dir = tiny_cli_run["run_dir"]
    markdown = (run_dir / "report" / "report.md").read_text()
    check_report(
        markdown,
        read_json(run_dir / "evaluation" / "results.json"),
        read_json(run_dir / "plan.json"),
    )


def test_wins_ties_and_geometric_means_on_chosen_numbers(tiny_cli_run, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_cli_run["run_dir"], run_dir)
    plan = read_json(run_dir / "plan.json")
    assert plan["baseline"] == "MHo-IHo"
    assert plan["trained_domains"] == ["d0", "d1", "d2"]
    assert plan["held_out_domains"] == ["d3", "d4"]
    chosen = {  # domain: MHo-IHo (baseline), MHo-IHe, MHe-IHo
        "d0": (10.0, 11.0, 12.0),  # the baseline wins
        "d1": (20.0, 19.9990, 25.0),  # 0.005% better: a tie, the baseline keeps it
        "d2": (40.0, 30.0, 35.0),  # MHo-IHe wins
        "d3": (80.0, 90.0, 70.0),  # MHe-IHo wins (held out)
        "d4": (160.0, 170.0, 161.0),  # the baseline wins (held out)
    }
    path = run_dir / "evaluation" / "results.json"
    results = read_json(path)
    for column, name in enumerate(("MHo-IHo", "MHo-IHe", "MHe-IHo")):
        configuration = results["configurations"][name]
        domains = configuration["iterations"][str(configuration["final_iteration"])]["domains"]
        for domain, values in chosen.items():
            domains[domain]["methods"][HEADLINE]["perplexity"] = values[column]
    del results["uncertainty"]  # as with evaluation.bootstrap_resamples: 0
    write_json(path, results)

    markdown = report(run_dir)
    check_report(markdown, results, plan)
    # The same, spelt out: 2 wins of 5 (MHo-IHe on d2, MHe-IHo on d3); the tie is no win.
    assert "lowest perplexity in 2 of 5 domains** (1 of 3 trained, 1 of 2 held out;" in markdown
    assert "No confidence intervals were computed" in markdown
    assert "| d1 | moderate | **20.00** | 20.00 | 25.00 |" in markdown
    # Baseline: (10 * 20 * 40 * 80 * 160) ** (1/5) = 40.
    assert "| domain posterior, uniform prior | 40.00 |" in markdown


def test_only_intervals_that_exclude_zero_count_as_wins(tiny_cli_run, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_cli_run["run_dir"], run_dir)
    path = run_dir / "evaluation" / "results.json"
    results = read_json(path)
    # delta = log ppl(candidate) - log ppl(reference), interval [low, high], per domain:
    chosen = {
        # MHo-IHe clearly better than both: a significant heterogeneous win.
        "d0": {
            ("MHo-IHo", "MHo-IHe"): -0.1,
            ("MHo-IHo", "MHe-IHo"): 0.0,
            ("MHo-IHe", "MHe-IHo"): 0.1,
        },
        # Everything inside the noise: a tie, although MHe-IHo's number is lowest.
        "d1": {
            ("MHo-IHo", "MHo-IHe"): 0.0,
            ("MHo-IHo", "MHe-IHo"): -0.01,
            ("MHo-IHe", "MHe-IHo"): 0.0,
        },
        # The baseline better than both.
        "d2": {
            ("MHo-IHo", "MHo-IHe"): 0.1,
            ("MHo-IHo", "MHe-IHo"): 0.1,
            ("MHo-IHe", "MHe-IHo"): 0.0,
        },
        # MHe-IHo beats the baseline but not MHo-IHe: no one is best, a tie.
        "d3": {
            ("MHo-IHo", "MHo-IHe"): -0.1,
            ("MHo-IHo", "MHe-IHo"): -0.1,
            ("MHo-IHe", "MHe-IHo"): 0.0,
        },
        "d4": {
            ("MHo-IHo", "MHo-IHe"): 0.0,
            ("MHo-IHo", "MHe-IHo"): 0.0,
            ("MHo-IHe", "MHe-IHo"): 0.0,
        },
    }
    for pair in results["uncertainty"]["configurations"]:
        if pair["method"] == HEADLINE:
            centre = chosen[pair["domain"]][(pair["reference"], pair["candidate"])]
            # A zero centre gets a wide interval around zero; others a narrow one.
            width = 0.05 if centre == 0.0 else 0.02
            pair.update(delta=centre, low=centre - width, high=centre + width)
    write_json(path, results)
    markdown = report(run_dir)
    check_report(markdown, results, read_json(run_dir / "plan.json"))
    assert (
        "**A heterogeneous configuration wins 1 of 5 domains, the baseline MHo-IHo wins 1; "
        "0 tied best (equivalent), 3 tied best (undecided)** (1 of 3 trained domains won by a "
        "heterogeneous configuration;" in markdown
    )
    assert (
        "MHo-IHo wins 1 of 5 domains, MHo-IHe wins 1 of 5 domains, MHe-IHo wins 0 of 5 domains; "
        "tied best: MHo-IHo, MHo-IHe, MHe-IHo (undecided) in 2 domains; MHo-IHe, MHe-IHo "
        "(undecided) in 1 domain" in markdown
    )
    # d3: both heterogeneous configurations beat the baseline, not each other: one group.
    assert "| tied best (undecided): MHo-IHe, MHe-IHo |" in markdown
    header, *rows = table_after(
        markdown, "## Confidence intervals (domain posterior, uniform prior)"
    )
    assert header[2:] == ["MHo-IHe vs MHo-IHo", "MHe-IHo vs MHo-IHo"]
    # exp(-0.1) - 1 = -9.5%, interval exp(-0.12) - 1, exp(-0.08) - 1: beyond the margin, a win.
    assert rows[0][2] == "**-9.5% [-11.3, -7.7] win**"
    assert rows[0][3] == "+0.0% [-4.9, +5.1] undecided"


def test_a_certain_difference_inside_the_margin_is_equivalent_not_a_win(tiny_cli_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_cli_run["run_dir"], run_dir)
    path = run_dir / "evaluation" / "results.json"
    results = read_json(path)
    # Every configuration 0.1% to 0.3% better than the one before it, with certainty: the
    # old rule (the interval excludes zero) called that a win; the margin calls it equivalent.
    for pair in results["uncertainty"]["configurations"]:
        pair.update(delta=-0.002, low=-0.003, high=-0.001)
    write_json(path, results)
    markdown = report(run_dir)
    check_report(markdown, results, read_json(run_dir / "plan.json"))
    assert "wins 0 of 5 domains, the baseline MHo-IHo wins 0; 5 tied best (equivalent)" in markdown
    assert "| tied best (equivalent): MHo-IHo, MHo-IHe, MHe-IHo |" in markdown
    # With evaluation.min_effect 0 in the run's config the same intervals are wins.
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("min_effect: 0.005", "min_effect: 0.0"))
    assert "min_effect: 0.0" in config.read_text()
    assert "wins 0 of 5 domains, the baseline MHo-IHo wins 0;" not in report(run_dir)
