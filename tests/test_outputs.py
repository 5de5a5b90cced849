"""hdee never deletes what it did not write (hdee.outputs): every command that writes a path the
user names refuses a non-empty target that is not its own earlier output, --overwrite only adds
beside, and a planted file and sub-folder survive every refusal and every overwrite."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_config
from hdee.cli import main
from hdee.config import UsageError
from hdee.layout import RunLayout
from hdee.outputs import (
    MARKER,
    OutputError,
    check_output_file,
    check_run_directory,
    is_weights_jsonl,
    output_directory,
)


def plant(directory: Path) -> dict[str, str]:
    """A user's file and sub-folder in `directory`; returns what they hold."""
    (directory / "sub").mkdir(parents=True, exist_ok=True)
    (directory / "notes.txt").write_text("mine\n")
    (directory / "sub" / "keep.txt").write_text("mine too\n")
    return {"notes.txt": "mine\n", "sub/keep.txt": "mine too\n"}


def intact(directory: Path) -> bool:
    return (directory / "notes.txt").read_text() == "mine\n" and (
        directory / "sub" / "keep.txt"
    ).read_text() == "mine too\n"


def listing(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes (the run lock, rewritten by every command
    that takes it, left out)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file() and p.name != "run.lock"
    }


def write_output(target: Path, files: dict[str, str], overwrite: bool = False) -> None:
    with output_directory(target, "hdee test", "OUT", overwrite) as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)


def marker_files(target: Path) -> list[str]:
    return json.loads((target / MARKER).read_text())["files"]


# ----------------------------------------------------------------------------------------------
# The mechanism


def test_a_new_or_empty_directory_gets_the_output_and_its_marker(tmp_path: Path):
    for target in (tmp_path / "new" / "out", tmp_path / "empty"):
        if target.name == "empty":
            target.mkdir()
        write_output(target, {"a.txt": "a", "d/b.txt": "b"})
        assert listing(target).keys() == {"a.txt", "d/b.txt", MARKER}
        assert marker_files(target) == ["a.txt", "d/b.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary is left"


def test_an_earlier_output_is_replaced_and_what_the_user_added_stays(tmp_path: Path):
    target = tmp_path / "out"
    write_output(target, {"a.txt": "old", "b.txt": "old", "d/c.txt": "old"})
    plant(target)
    write_output(target, {"a.txt": "new", "e.txt": "new"})  # no --overwrite: it is ours
    assert intact(target)
    assert (target / "a.txt").read_text() == "new" and (target / "e.txt").read_text() == "new"
    assert not (target / "b.txt").exists() and not (target / "d").exists(), "old files stayed"
    assert marker_files(target) == ["a.txt", "e.txt"]
    write_output(target, {"a.txt": "newer"})
    assert intact(target) and marker_files(target) == ["a.txt"]


def test_an_output_alone_is_swapped_whole(tmp_path: Path):
    target = tmp_path / "out"
    write_output(target, {"a.txt": "old", "b.txt": "old"})
    write_output(target, {"c.txt": "new"})
    assert listing(target).keys() == {"c.txt", MARKER}


def test_a_directory_that_is_not_an_earlier_output_is_refused(tmp_path: Path):
    target = tmp_path / "project"
    plant(target)
    before = listing(target)
    with pytest.raises(
        OutputError, match=rf"OUT {re.escape(str(target))}: not empty .*--overwrite"
    ) as error:
        write_output(target, {"a.txt": "a"})
    assert isinstance(error.value, UsageError)  # exit 2
    (target / MARKER).write_text(json.dumps({"format": "hdee-output", "command": "hdee other"}))
    with pytest.raises(OutputError, match="not an earlier output of `hdee test`"):
        write_output(target, {"a.txt": "a"})  # another command's output is not this one's
    (target / MARKER).unlink()
    assert listing(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["project"], "something was staged and left"


def test_overwrite_writes_beside_and_never_replaces_a_users_file(tmp_path: Path):
    target = tmp_path / "project"
    plant(target)
    write_output(target, {"a.txt": "a", "sub/b.txt": "b"}, overwrite=True)
    assert intact(target) and (target / "sub" / "b.txt").read_text() == "b"
    assert marker_files(target) == ["a.txt", "sub/b.txt"]
    write_output(target, {"c.txt": "c"})  # now an earlier output: no flag needed
    assert intact(target) and not (target / "sub" / "b.txt").exists()
    assert (target / "sub").is_dir(), "a folder holding the user's file was removed"
    for name in ("notes.txt", "sub/keep.txt", "sub"):
        with pytest.raises(OutputError, match=f"{name} already there and not written by"):
            write_output(target, {name: "x"}, overwrite=True)
    assert intact(target) and (target / "c.txt").read_text() == "c"


def test_a_file_or_a_root_is_never_an_output_directory(tmp_path: Path):
    target = tmp_path / "file.txt"
    target.write_text("mine\n")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="exists and is not a directory"):
            write_output(target, {"a.txt": "a"}, overwrite)
    assert target.read_text() == "mine\n"
    with pytest.raises(OutputError, match="filesystem root"):
        write_output(Path("/"), {"a.txt": "a"}, overwrite=True)


def test_a_failed_output_leaves_the_target_as_it_was(tmp_path: Path):
    target = tmp_path / "out"
    write_output(target, {"a.txt": "old"})
    plant(target)
    before = listing(target)
    with pytest.raises(RuntimeError, match="boom"):
        with output_directory(target, "hdee test", "OUT") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert listing(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_output_replaces_only_its_own_earlier_file(tmp_path: Path):
    record = {"step": 0, "token_id": 5, "token": "a", "log_prob": -1.0, "weights": {"easy": 1.0}}
    ours = tmp_path / "w.jsonl"
    ours.write_text(json.dumps(record) + "\n")
    assert is_weights_jsonl(ours)
    check_output_file(ours, "hdee generate", "--weights-jsonl", is_weights_jsonl)
    check_output_file(tmp_path / "new.jsonl", "hdee generate", "--weights-jsonl", is_weights_jsonl)
    (tmp_path / "empty.jsonl").touch()
    check_output_file(
        tmp_path / "empty.jsonl", "hdee generate", "--weights-jsonl", is_weights_jsonl
    )
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text(json.dumps({**record, "mine": 1}) + "\n")
    (tmp_path / "link.jsonl").symlink_to(ours)
    plant(tmp_path / "dir")
    for path, message in [
        (theirs, "exists and was not written by `hdee generate`"),
        (tmp_path / "link.jsonl", "a symbolic link"),
        (tmp_path / "dir", "not a regular file"),
    ]:
        with pytest.raises(OutputError, match=re.escape(f"--weights-jsonl {path}: {message}")):
            check_output_file(path, "hdee generate", "--weights-jsonl", is_weights_jsonl)
    assert intact(tmp_path / "dir")


def test_generate_writes_what_it_recognises(tiny_cli_run: dict, tmp_path: Path):
    from hdee.generate import continue_from_run, weights_jsonl

    continuation = continue_from_run(
        RunLayout.of(tiny_cli_run["run_dir"]), "MHe-IHo", "the", max_new_tokens=2
    )
    path = tmp_path / "recognised.jsonl"
    path.write_text(weights_jsonl(continuation))
    assert is_weights_jsonl(path)  # the recogniser and the writer stay in step


def test_a_run_directory_is_a_new_empty_or_earlier_run(tmp_path: Path):
    layout = RunLayout.of(tmp_path / "run")
    check_run_directory(layout, "run_dir", False)  # new
    layout.run_root.mkdir()
    check_run_directory(layout, "run_dir", False)  # empty
    layout.lock.write_text("hdee prepare, pid 12\n")
    check_run_directory(layout, "run_dir", False)  # stopped before it saved the config
    plant(layout.run_root)
    with pytest.raises(OutputError, match=r"run_dir .*: not empty and not an hdee run directory"):
        check_run_directory(layout, "run_dir", False)
    check_run_directory(layout, "run_dir", True)  # the lock is hdee's: nothing taken
    layout.config.write_text("run_dir: x\n")  # a user's own config.yaml
    with pytest.raises(OutputError, match="config.yaml already there and not written by hdee"):
        check_run_directory(layout, "run_dir", True)
    layout.config.write_text("# The resolved config of this run (written by hdee).\nseed: 0\n")
    check_run_directory(layout, "run_dir", False)  # an earlier run
    assert intact(layout.run_root)


# ----------------------------------------------------------------------------------------------
# Through the commands


def hdee(*argv: object) -> int:
    return main([str(a) for a in argv])


def test_export_refuses_a_users_folder_the_run_and_its_parent(
    tiny_finished_run: Path, tmp_path: Path, capsys
):
    parent = tmp_path / "parent"
    run = parent / "run"
    shutil.copytree(tiny_finished_run, run)
    project = tmp_path / "project"
    for target in (project, run, parent):
        plant(target)
    run_files = listing(run)
    export = ["export", run, "--configuration", "MHo-IHo"]
    for target in (project, run, parent):
        assert hdee(*export, target) == 2
        err = capsys.readouterr().err
        assert f"OUT {target}: not empty and not an earlier output of `hdee export`" in err
        assert "--overwrite" in err
        assert intact(target) and not (target / MARKER).exists()
    assert listing(run) == run_files
    for target in (project, run, parent):
        assert hdee(*export, target, "--overwrite") == 0
        assert intact(target) and (target / "model.safetensors").is_file()
    added = set(json.loads((run / MARKER).read_text())["files"]) | {MARKER}
    assert {k: v for k, v in listing(run).items() if k not in added} == run_files
    assert not added & set(run_files), "an export file replaced a file of the run"
    # An earlier export beside the user's files: replaced without the flag, theirs kept.
    assert hdee("export", run, "--configuration", "MHe-IHo", project) == 0
    config = json.loads((project / "config.json").read_text())
    assert config["hdee"]["configuration"] == "MHe-IHo" and intact(project)


def test_export_never_replaces_a_users_file_of_the_same_name(
    tiny_finished_run: Path, tmp_path: Path, capsys
):
    project = tmp_path / "project"
    plant(project)
    (project / "config.json").write_text("{}\n")
    argv = ["export", tiny_finished_run, "--configuration", "MHo-IHo", project, "--overwrite"]
    assert hdee(*argv) == 2
    assert "config.json already there and not written by `hdee export`" in capsys.readouterr().err
    assert intact(project) and (project / "config.json").read_text() == "{}\n"
    assert sorted(p.name for p in project.iterdir()) == ["config.json", "notes.txt", "sub"]


def test_generate_weights_never_replace_a_users_file(tiny_cli_run: dict, tmp_path: Path, capsys):
    argv = ["generate", tiny_cli_run["run_dir"], "--configuration", "MHe-IHo", "--prompt", "the"]
    argv += ["--max-new-tokens", "2", "--weights-jsonl"]
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"mine": 1}\n')
    folder = tmp_path / "folder"
    plant(folder)
    for target in (mine, folder):
        assert hdee(*argv, target) == 2
        assert f"--weights-jsonl {target}: " in capsys.readouterr().err
    assert mine.read_text() == '{"mine": 1}\n' and intact(folder)
    ours = tmp_path / "w.jsonl"
    assert hdee(*argv, ours) == 0 and hdee(*argv, ours) == 0  # its own earlier file: replaced
    assert is_weights_jsonl(ours)


def write_config(tmp_path: Path, run_dir: Path) -> Path:
    raw = tiny_run_config(tmp_path)
    raw["run_dir"] = str(run_dir)
    raw["data"]["domains"] = raw["data"]["domains"][:5]
    raw["plan"]["held_out"] = ["d3", "d4"]
    raw["plan"]["iterations"] = 1
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "argv",
    [["prepare", "{config}", "--quiet"], ["jobs", "{config}", "seeds"], ["run", "{config}"]],
    ids=["prepare", "jobs", "run"],
)
def test_a_run_never_starts_in_a_users_folder(tmp_path: Path, capsys, argv: list[str]):
    project = tmp_path / "project"
    plant(project)
    (project / "data").mkdir()
    (project / "data" / "mine.csv").write_text("1,2\n")
    config = write_config(tmp_path, project)
    command = [a.format(config=config) for a in argv]
    before = listing(project)
    assert hdee(*command) == 2
    err = capsys.readouterr().err
    assert f"{config}: run_dir {project}: not empty and not an hdee run directory" in err
    assert hdee(*command, "--overwrite") == 2
    assert "data already there and not written by hdee" in capsys.readouterr().err
    assert listing(project) == before and sorted(p.name for p in project.iterdir()) == [
        "data",
        "notes.txt",
        "sub",
    ]


def test_overwrite_puts_a_run_beside_a_users_files(tmp_path: Path):
    project = tmp_path / "project"
    plant(project)
    config = write_config(tmp_path, project)
    assert hdee("prepare", config, "--quiet", "--overwrite") == 0
    assert intact(project) and (project / "config.yaml").is_file()
    # Now an earlier run: every command writes it without the flag.
    assert hdee("prepare", config, "--quiet") == 0
    assert hdee("jobs", config, "seeds") == 0
    assert hdee("run", config, "--until", "prepare", "--quiet") == 0
    assert intact(project)


def test_the_demo_never_starts_in_a_users_folder(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    from hdee import demo

    project = tmp_path / "project"
    plant(project)
    plant(project / "corpus")
    assert hdee("demo", "--quick", "--run-dir", project) == 2
    assert f"--run-dir {project}: not empty and not an hdee run directory" in (
        capsys.readouterr().err
    )
    assert hdee("demo", "--quick", "--run-dir", project, "--overwrite") == 2
    assert "corpus already there and not written by hdee" in capsys.readouterr().err
    assert intact(project) and intact(project / "corpus")
    shutil.move(project / "corpus", tmp_path / "corpus-moved")

    def stop(*args: object, **kwargs: object) -> None:
        raise RuntimeError("stopped where the demo gathers its corpus")

    monkeypatch.setattr(demo, "gather_demo_corpus", stop)
    assert hdee("demo", "--quick", "--run-dir", project, "--overwrite") == 1
    assert "stopped where the demo gathers its corpus" in capsys.readouterr().err
    assert intact(project)


def test_report_keeps_a_users_files_in_the_run(tiny_cli_run: dict, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(tiny_cli_run["run_dir"], run)
    plant(run)
    plant(run / "report")
    assert hdee("report", run) == 0
    assert intact(run) and intact(run / "report") and (run / "report" / "report.md").is_file()


def test_a_demo_stopped_after_gathering_its_corpus_is_an_earlier_demo(tmp_path: Path):
    from hdee.demo import CONFIG_FILE, CONFIG_HEADER, CORPUS_DIR

    ours = {CORPUS_DIR: None, CONFIG_FILE: CONFIG_HEADER}
    layout = RunLayout.of(tmp_path / "demo")
    (layout.run_root / CORPUS_DIR).mkdir(parents=True)
    (layout.run_root / CONFIG_FILE).write_text(CONFIG_HEADER + "seed: 0\n")
    check_run_directory(layout, "--run-dir", False, extra=ours)  # the demo resumes there
    (layout.run_root / CONFIG_FILE).write_text("seed: 0\n")  # a demo.yaml of the user's
    with pytest.raises(OutputError, match="not an hdee run directory"):
        check_run_directory(layout, "--run-dir", False, extra=ours)
