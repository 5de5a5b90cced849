"""constraints.txt (what `make` installs) agrees with pyproject.toml's ranges, and leaves
torch to the Makefile's TORCH_SPEC."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_pin_is_inside_pyprojects_range():
    project = pyproject()["project"]
    declared = [Requirement(line) for line in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        declared += [Requirement(line) for line in extra]
    pins = constraints()
    assert "torch" not in pins, "torch is pinned by the Makefile's TORCH_SPEC, per platform"
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{requirement.name} is a dependency but not in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]} outside pyproject's {requirement}"
        )


def test_the_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "CONSTRAINTS ?= constraints.txt" in makefile
    assert makefile.count("$(PIP_CONSTRAINTS) -e") == 2  # hdee, and hdee with dev extras


def test_the_version_is_spelt_once(capsys: pytest.CaptureFixture[str]) -> None:
    """pyproject's version is hdee.__version__ (what `hdee --version` prints, what a release
    tags as v<version> and names its fixture run after: docs/releasing.md)."""
    from packaging.version import Version

    from hdee import __version__
    from hdee.cli import main

    build = pyproject()["tool"]["setuptools"]["dynamic"]["version"]
    assert "version" in pyproject()["project"]["dynamic"] and build == {"attr": "hdee.__version__"}
    assert str(Version(__version__)) == __version__  # a PEP 440 version, normalised
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"hdee {__version__}"
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{__version__}]" in changelog  # the release has its entry
