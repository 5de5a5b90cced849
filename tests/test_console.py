"""What hdee shows: the progress switch, plain progress lines, tables that never cut an id,
`hdee plan` piped and on a narrow terminal."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from hdee.cli import main
from hdee.config import parse_config
from hdee.console import job_log, print_table, progress, progress_mode, progress_setting
from hdee.formatting import duration, si
from hdee.plan import build_plan
from hdee.show import print_plan

LONG_ID = "expert-M-a_rather_long_domain_name-400-0123456789"


@pytest.fixture(autouse=True)
def no_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HDEE_PROGRESS", raising=False)
    monkeypatch.delenv("HDEE_NO_PROGRESS", raising=False)


def test_the_switch(monkeypatch: pytest.MonkeyPatch):
    # Under pytest stderr is not a terminal: auto means plain lines.
    assert progress_setting() == "auto"
    assert progress_mode() == "plain"
    assert progress_mode(enabled=False) == "off"  # --quiet
    for value, mode in (("0", "off"), ("plain", "plain"), ("1", "bar"), (" Auto ", "plain")):
        monkeypatch.setenv("HDEE_PROGRESS", value)
        assert progress_mode() == mode, value
    monkeypatch.delenv("HDEE_PROGRESS")
    monkeypatch.setenv("HDEE_NO_PROGRESS", "1")  # the deprecated alias
    assert progress_mode() == "off"
    monkeypatch.setenv("HDEE_PROGRESS", "plain")  # the new name wins
    assert progress_mode() == "plain"
    monkeypatch.setenv("HDEE_PROGRESS", "yes")
    with pytest.raises(ValueError, match=r"HDEE_PROGRESS='yes': expected one of auto, 1, plain"):
        progress_mode()


def test_a_mistyped_switch_fails_before_any_work(monkeypatch, tmp_path: Path, capsys):
    monkeypatch.setenv("HDEE_PROGRESS", "quiet")
    assert main(["prepare", str(tmp_path / "missing.yaml")]) == 1
    assert "HDEE_PROGRESS='quiet'" in capsys.readouterr().err


def test_plain_lines_every_5_percent_with_fields_and_eta(capsys):
    with progress("seed x", total=200, completed=40, unit="steps", loss="-") as bar:
        for step in range(41, 201):
            bar.update(step, loss=f"{step / 100:.4f}", tok_per_s=f"{step * 1000:,}")
    lines = capsys.readouterr().err.splitlines()
    # From step 40: a line at every 10 steps (5 % of 200), the last one at 200.
    assert [int(re.search(r": (\d+)/200 steps", line)[1]) for line in lines] == list(
        range(50, 201, 10)
    )
    assert lines[0].startswith("seed x: 50/200 steps (25%)  loss 0.5000  tok/s 50,000  ")
    assert "ETA" in lines[0] and "elapsed" in lines[0]
    assert lines[-1].startswith("seed x: 200/200 steps (100%)  loss 2.0000")
    assert "ETA" not in lines[-1]


def test_plain_count_without_total_prints_once_at_the_end(capsys):
    with progress("general: tokenizing", unit="docs", MB="0.0") as bar:
        for n in range(1, 1001):
            bar.update(n, MB=f"{n / 100:.1f}")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("general: tokenizing: 1,000 docs  MB 10.0  ")


def test_quiet_and_zero_show_nothing(monkeypatch, capsys):
    with progress("x", total=10, enabled=False) as bar:
        bar.update(10)
    monkeypatch.setenv("HDEE_PROGRESS", "0")
    with progress("x", total=10) as bar:
        bar.update(10)
    assert capsys.readouterr() == ("", "")


def test_a_job_log_gets_plain_lines_whatever_the_switch(monkeypatch, tmp_path: Path, capsys):
    monkeypatch.setenv("HDEE_PROGRESS", "1")
    log = tmp_path / "job" / "train.log"
    with job_log(log):
        print("hello from the job")
        with progress("expert y", total=4, unit="steps") as bar:
            bar.update(4, loss="1.2345")
    assert capsys.readouterr() == ("", "")
    text = log.read_text()
    assert "hello from the job" in text
    assert "expert y: 4/4 steps (100%)  loss 1.2345" in text
    assert "\x1b[" not in text  # no terminal codes in a file
    assert progress_mode() == "bar"  # the log's setting ended with it


def test_a_live_bar_inside_another_shares_its_display(monkeypatch, capsys):
    monkeypatch.setenv("HDEE_PROGRESS", "1")
    with progress("jobs", total=2, unit="jobs") as outer:
        for job in range(2):
            with progress(f"job {job}", total=3, unit="steps") as inner:
                assert inner._progress is outer._progress  # rich allows one live display
                inner.update(3, loss="0.5")
            outer.update(advance=1)
    err = capsys.readouterr().err
    assert "2/2 jobs" in err


def table_output(width: int, terminal: bool) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=terminal, color_system=None)
    print_table(
        ["job", "domain", "steps"],
        [[LONG_ID, "a_rather_long_domain_name", 400], ["seed-S-general-ab12", "general", 12]],
        title="Jobs",
        right={"steps"},
        console=console,
    )
    return console.file.getvalue()


def test_a_table_off_a_terminal_is_plain_aligned_rows_never_cut():
    out = table_output(width=30, terminal=False)
    width = len(LONG_ID)
    assert out.splitlines() == [
        "Jobs",
        f"{'job':{width}}  domain                     steps",
        f"{LONG_ID}  a_rather_long_domain_name    400",
        f"{'seed-S-general-ab12':{width}}  general                       12",
    ]


def test_a_table_on_a_narrow_terminal_folds_ids_instead_of_eliding_them():
    out = table_output(width=40, terminal=True)
    assert "…" not in out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    # The job column of the first row, read down its folded lines, is the whole id.
    first_row = []
    for line in rows:
        cell = line.split("│")[1].strip()
        if cell.startswith("seed-"):
            break
        first_row.append(cell)
    assert "".join(first_row) == LONG_ID
    assert max(len(line) for line in out.splitlines()) <= 40


def narrow_plan(tmp_path: Path):
    raw = {
        "run_dir": str(tmp_path / "run"),
        "data": {
            "seq_len": 32,
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "general": {"name": "general", "source": {"type": "local", "paths": ["g"]}},
            "domains": [
                {
                    "name": f"a_rather_long_domain_name_{i}",
                    "source": {"type": "local", "paths": ["x"]},
                }
                for i in range(3)
            ],
        },
        "model": {"preset": "tiny"},
        "plan": {
            "iterations": 1,
            "schedule": {
                "easy": ["a_rather_long_domain_name_0"],
                "moderate": ["a_rather_long_domain_name_1"],
                "difficult": ["a_rather_long_domain_name_2"],
            },
        },
    }
    return build_plan(parse_config(raw, base_dir=tmp_path), 300)


def test_print_plan_piped_keeps_every_job_id_whole(tmp_path: Path):
    plan = narrow_plan(tmp_path)
    console = Console(file=io.StringIO(), width=40)  # not a terminal
    print_plan(plan, console)
    out = console.file.getvalue()
    assert "…" not in out
    lines = out.splitlines()
    for job in plan.jobs.values():
        (line,) = [line for line in lines if line.startswith(job.job_id + " ")]
        assert job.domain in line.split()
        if job.init_from:
            assert job.init_from in line.split()
    assert any("(baseline)" in line for line in lines)
    assert any(line.startswith("Seeds (") for line in lines)


def test_hdee_plan_piped_at_80_columns_prints_whole_ids(tmp_path: Path, monkeypatch, capsys):
    plan = narrow_plan(tmp_path)
    config = tmp_path / "experiment.yaml"
    import yaml

    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "data": {
                    "seq_len": 32,
                    "tokenizer": {"kind": "bpe", "vocab_size": 300},
                    "general": {"name": "general", "source": {"type": "local", "paths": ["g"]}},
                    "domains": [
                        {
                            "name": f"a_rather_long_domain_name_{i}",
                            "source": {"type": "local", "paths": ["x"]},
                        }
                        for i in range(3)
                    ],
                },
                "model": {"preset": "tiny"},
                "plan": {"iterations": 1, "schedule": plan.schedule},
            }
        )
    )
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    for job_id in plan.jobs:
        assert re.search(rf"^{re.escape(job_id)}  ", out, re.MULTILINE), job_id
    assert max(len(line) for line in out.splitlines()) > 80  # rows are as wide as they need


def test_formatting():
    assert si(4.29e17) == "429P"
    assert si(11_100_000) == "11.1M"
    assert si(12) == "12"
    assert [duration(s) for s in (0, 42.4, 187, 7500)] == ["0s", "42s", "3m07s", "2h05m"]
