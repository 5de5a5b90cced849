"""The demo corpus: enough disjoint domains of real text, deterministic, robust to missing
sources, and a config the experiment accepts."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from hdee import demo_corpus as dc
from hdee.config import parse_config

# Sources that need a Debian text package (scripts/install-demo-sources.sh installs them).
PACKAGED_ROOTS = ("DICTD_DIR", "FORTUNES_DIR", "JARGON_TXT")


@pytest.fixture(scope="module")
def quick_corpus(tmp_path_factory: pytest.TempPathFactory) -> dc.DemoCorpus:
    return dc.gather_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", quick=True)


def _documents(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.txt"))}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.txt"))}


def test_quick_corpus_has_enough_disjoint_domains(quick_corpus: dc.DemoCorpus) -> None:
    corpus = quick_corpus
    if not corpus.missing:  # every source present: the paper-shaped 9 trained + 3 held out
        assert len(corpus.trained) == 9
        assert len(corpus.held_out) == 3
    else:  # fallbacks: still a runnable demo
        assert len(corpus.trained) >= 3 and len(corpus.held_out) >= 1
    assert len(set(corpus.domain_names)) == len(corpus.domains)
    assert "general" not in corpus.domain_names

    owner: dict[str, str] = {}
    for domain in [corpus.general, *corpus.domains]:
        docs = _documents(domain.path)
        assert len(docs) == domain.documents >= 10, domain.name
        # Quick mode stays small: about 150 KB per domain (one document of slack).
        assert (
            domain.bytes
            <= dc.QUICK_BYTES_PER_DOMAIN * (3 if domain is corpus.general else 1) + 20_000
        )
        for text in docs.values():
            assert len(text.encode()) >= dc.MIN_DOC_BYTES
            digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
            assert digest not in owner, f"{domain.name} repeats a document of {owner.get(digest)}"
            owner[digest] = domain.name

    described = json.loads((corpus.root / "corpus.json").read_text())
    assert [d["name"] for d in described["domains"]] == corpus.domain_names


def test_difficulty_is_visibly_spread(quick_corpus: dc.DemoCorpus) -> None:
    # zlib ratio as a cheap proxy for difficulty: the domains must not all look alike.
    ratios = [d.zlib_ratio for d in quick_corpus.domains]
    assert max(ratios) - min(ratios) > 0.08


def test_gathering_is_deterministic(quick_corpus: dc.DemoCorpus, tmp_path: Path) -> None:
    again = dc.gather_demo_corpus(tmp_path / "again", quick=True)
    assert _tree(again.root) == _tree(quick_corpus.root)
    assert again.domain_names == quick_corpus.domain_names
    assert [d.held_out for d in again.domains] == [d.held_out for d in quick_corpus.domains]


def test_missing_sources_are_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in PACKAGED_ROOTS:
        monkeypatch.setattr(dc, name, empty)
    monkeypatch.setattr(dc, "BIBLE_COMMAND", "no-such-bible-command")

    corpus = dc.gather_demo_corpus(tmp_path / "corpus", quick=True)

    assert len(corpus.trained) >= 3 and len(corpus.held_out) >= 1
    gone = {"bible", "gcide", "jargon", "fortunes", "devil", "foldoc"}
    assert not gone & set(corpus.domain_names)
    missing = {m.domain: m for m in corpus.missing}
    assert {"bible", "gcide", "jargon"} <= set(missing)
    assert "bible-kjv" in missing["bible"].message
    assert "apt-get install dict-gcide" in missing["gcide"].message
    assert all("\n" not in m.message for m in corpus.missing)


def test_too_few_sources_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in (
        *PACKAGED_ROOTS,
        "MAN_DIR",
        "INFO_DIR",
        "DOC_DIR",
        "COMMON_LICENSES_DIR",
        "LOCALES_DIR",
        "INCLUDE_DIR",
        "PY_INCLUDE_DIR",
        "STDLIB_DIR",
    ):
        monkeypatch.setattr(dc, name, empty)
    monkeypatch.setattr(dc, "PERL_DIRS", (empty,))
    monkeypatch.setattr(dc, "SITE_PACKAGES_DIRS", (empty,))
    monkeypatch.setattr(dc, "BIBLE_COMMAND", "no-such-bible-command")

    with pytest.raises(dc.DemoCorpusError, match="apt-get install"):
        dc.gather_demo_corpus(tmp_path / "corpus", quick=True)
    assert not (tmp_path / "corpus").exists()  # nothing half-written


@pytest.mark.parametrize("quick", [True, False])
def test_config_validates(quick_corpus: dc.DemoCorpus, tmp_path: Path, quick: bool) -> None:
    raw = dc.demo_config(quick_corpus, tmp_path / "run", quick=quick)
    config = parse_config(raw)
    assert config.data.domain_names == quick_corpus.domain_names
    assert config.plan.held_out == [d.name for d in quick_corpus.held_out]
    assert config.plan.iterations * 3 <= len(quick_corpus.trained)
    assert config.model.preset == "tiny"
    for corpus in [config.data.general, *config.data.domains]:
        assert all(Path(p).is_dir() for p in corpus.source.paths)


def test_dictd_reader_splits_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A dictd database in miniature: gzip data + an index of base64 offsets and lengths.
    entries = [f"word{i}\n   Meaning number {i}, explained at some length.\n" for i in range(50)]
    data = "".join(entries).encode()
    digits = dc._DICTD_DIGITS

    def b64(n: int) -> str:
        out = ""
        while True:
            out = digits[n % 64] + out
            n //= 64
            if not n:
                return out

    index, offset = ["00-database-short\tA\tB"], 0
    for i, entry in enumerate(entries):
        index.append(f"word{i}\t{b64(offset)}\t{b64(len(entry.encode()))}")
        offset += len(entry.encode())
    (tmp_path / "mini.index").write_text("\n".join(index) + "\n")
    (tmp_path / "mini.dict.dz").write_bytes(gzip.compress(data))
    monkeypatch.setattr(dc, "DICTD_DIR", tmp_path)

    units = dc._dictd("mini", limit=500, skip=lambda e: e.startswith("word7\n"))
    texts = [u.load() for u in units]
    assert len(units) > 3
    assert all(len(t.encode()) <= 500 for t in texts)
    joined = "\n\n".join(texts)
    assert "word0\n" in joined and "word49\n" in joined and "word7\n" not in joined


def test_roff_to_text_keeps_words_drops_markup() -> None:
    page = (
        '.\\" a comment\n.TH LS 1\n.de XX\nmacro body\n..\n.SH NAME\nls \\- list files\n'
        ".SH DESCRIPTION\n.B ls\nlists \\fIdirectory\\fR contents\\(em quickly.\n"
    )
    text = dc._roff_to_text(page)
    assert "NAME" in text and "ls - list files" in text
    assert "lists directory contents-- quickly." in text
    assert "macro body" not in text and "comment" not in text and "\\f" not in text


def test_the_install_script_installs_what_the_corpus_may_read() -> None:
    script = (Path(__file__).parents[1] / dc.INSTALL_SCRIPT).read_text()
    listed = {
        spec.split("=")[0]
        for variable in ("PINNED", "UNPINNED")
        for spec in script.split(f'{variable}="')[1].split('"')[0].replace("\\", " ").split()
    }
    assert listed == set(dc.DEMO_PACKAGES) - {"base-files"}  # base-files: on every Debian
    # Every catalogue entry that names a package names one of these.
    assert {p for spec in dc.CATALOGUE for p in spec.packages} <= set(dc.DEMO_PACKAGES)


def test_debian_files_count_only_when_a_pinned_package_installed_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = tmp_path / "doc"
    for package in ("manpages", "someone-elses-tool"):
        (docs / package).mkdir(parents=True)
        changelog = docs / package / "changelog.Debian.gz"
        changelog.write_bytes(gzip.compress(f"{package} (1.0) unstable; urgency=low\n".encode()))
    info = tmp_path / "info"
    info.mkdir()
    (info / "manpages.list").write_text(
        f"/.\n{docs / 'manpages'}\n{docs}/manpages/changelog.Debian.gz\n"
    )
    (info / "someone-elses-tool.list").write_text(
        f"{docs}/someone-elses-tool/changelog.Debian.gz\n"
    )
    monkeypatch.setattr(dc, "DOC_DIR", docs)
    monkeypatch.setattr(dc, "DPKG_INFO_DIR", info)
    assert [u.key for u in dc._changelogs(10_000)] == ["manpages/changelog.Debian.gz"]
    # No dpkg database (not Debian): what is there counts, as before.
    monkeypatch.setattr(dc, "DPKG_INFO_DIR", tmp_path / "no-dpkg")
    assert len(dc._changelogs(10_000)) == 2


def test_python_files_count_only_when_hdee_tasks_brings_their_distribution() -> None:
    import importlib.metadata

    pinned = dc._python_entries(dc.SITE_PACKAGES_DIRS)
    if pinned is None:
        pytest.skip("hdee is not installed as a distribution here")
    entries, versions = pinned
    # hdee's own requirements and the tasks extra's are in; the dev extra's tools are not.
    assert {"torch", "transformers", "lm-eval", "numpy"} <= set(versions)
    assert not {"pytest", "ruff", "mutmut"} & set(versions)
    assert versions["torch"] == importlib.metadata.version("torch")
    assert "torch" in entries and "_pytest" not in entries and "pytest" not in entries
    units = dc._site_code(10_000)
    assert units and not any(u.key.startswith(("_pytest/", "pytest/", "ruff/")) for u in units)
