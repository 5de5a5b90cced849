"""The built-in demo corpus: real text that nobody on this project wrote, gathered offline.

`hdee demo` needs a dozen text domains of visibly different difficulty, a separate general
corpus for the seeds, and no network. Everything here comes from files a Debian machine with
Python already has (the Python standard library, installed PyPI packages, manual pages, info
manuals, licence texts, Debian changelogs) or gets from a few small Debian text packages
(the King James Bible, GCIDE/FOLDOC/V.E.R.A./Devil's dictionaries, the Jargon File, fortunes;
`scripts/install-demo-sources.sh` installs them). docs/demo.md lists every source, its package
and its licence.

`gather_demo_corpus` writes one .txt file per document, so the pipeline's document-level
train/validation/test split works unchanged, and `demo_config` turns the result into an
experiment config. Missing sources are reported and skipped; the selection falls back to the
sources that are always present.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sysconfig
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from hdee.atomic import atomic_directory, write_json
from hdee.console import warn

# Only for debug detail (a skipped file); what a person should read goes through console.warn.
log = logging.getLogger(__name__)

# Where the sources live. Module-level so tests (and unusual machines) can point them elsewhere.
DICTD_DIR = Path("/usr/share/dictd")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
JARGON_TXT = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
MAN_DIR = Path("/usr/share/man")
INFO_DIR = Path("/usr/share/info")
DOC_DIR = Path("/usr/share/doc")
COMMON_LICENSES_DIR = Path("/usr/share/common-licenses")
LOCALES_DIR = Path("/usr/share/i18n/locales")
INCLUDE_DIR = Path("/usr/include")
BIBLE_COMMAND = "bible"
PERL_DIRS = (Path("/usr/share/perl"),)
STDLIB_DIR = Path(sysconfig.get_paths()["stdlib"])
PY_INCLUDE_DIR = Path(sysconfig.get_paths()["include"])
SITE_PACKAGES_DIRS = tuple(
    sorted({Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"])})
)

QUICK_BYTES_PER_DOMAIN = 150_000
FULL_BYTES_PER_DOMAIN = 1_000_000
MIN_DOC_BYTES = 200
# A domain needs enough documents for an 80/10/10 document split to leave some in each part.
DOCS_PER_DOMAIN = 24
MAX_DOC_BYTES = 16_000
INSTALL_SCRIPT = "scripts/install-demo-sources.sh"
CLASSES = ("easy", "moderate", "difficult")


class DemoCorpusError(RuntimeError):
    """Too few sources are present to run the demo; the message says what to install."""


# ----------------------------------------------------------------------------------------------
# Public description of a gathered corpus


@dataclass(frozen=True)
class DemoDomain:
    name: str
    path: Path
    expected: str  # the class we expect the seeds to find: a hint for a balanced selection
    held_out: bool
    source: str
    packages: tuple[str, ...]
    documents: int
    bytes: int
    zlib_ratio: float  # zlib-compressed size / raw size: lower means more repetitive text


@dataclass(frozen=True)
class MissingSource:
    domain: str
    packages: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class DemoCorpus:
    root: Path
    quick: bool
    general: DemoDomain
    domains: tuple[DemoDomain, ...]
    missing: tuple[MissingSource, ...]
    unused: tuple[str, ...] = field(default=())  # present, but not needed for the selection
    # What it could read, with versions ({"debian": {...}, "python": {...}}, see
    # source_versions): equal versions give an equal corpus; the report prints its fingerprint.
    versions: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def trained(self) -> list[DemoDomain]:
        return [d for d in self.domains if not d.held_out]

    @property
    def held_out(self) -> list[DemoDomain]:
        return [d for d in self.domains if d.held_out]

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A small table for the terminal and the demo's report."""
        lines = [f"{'domain':<18} {'role':<9} {'expected':<10} {'docs':>5} {'KB':>7} {'zlib':>6}"]
        for d in [self.general, *self.domains]:
            role = "general" if d is self.general else ("held-out" if d.held_out else "trained")
            lines.append(
                f"{d.name:<18} {role:<9} {d.expected:<10} {d.documents:>5} "
                f"{d.bytes / 1000:>7.1f} {d.zlib_ratio:>6.3f}"
            )
        lines += [m.message for m in self.missing]
        debian, python = self.versions.get("debian", {}), self.versions.get("python", {})
        lines.append(
            f"read only from {len(debian)} pinned Debian packages and the {len(python)} PyPI "
            "distributions hdee[tasks] installs (versions: corpus.json)"
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Text helpers


@dataclass(frozen=True)
class Unit:
    """One candidate document: `key` orders the sample; `load` reads it only when chosen;
    `origin` is the file it comes from, which no other domain may use."""

    key: str
    load: Callable[[], str]
    origin: str


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _decode(data: bytes) -> str | None:
    """Text or None for binary files (NUL bytes, or mostly not UTF-8)."""
    if b"\x00" in data[:8192]:
        return None
    text = data.decode("utf-8", errors="replace")
    if text.count("\ufffd") > len(text) // 100:
        return None
    return text


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return _decode(data) or ""


def _truncate(text: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes, cut at a paragraph (or line) end where one is near."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    head = raw[:limit].decode("utf-8", errors="ignore")
    for sep in ("\n\n", "\n"):
        cut = head.rfind(sep)
        if cut > limit // 2:
            return head[:cut]
    return head


def _pieces(blocks: Iterable[str], limit: int, sep: str = "\n\n") -> list[str]:
    """Join consecutive blocks (paragraphs, entries, chapters) into pieces of about `limit`
    bytes, so one big file becomes several documents of a sensible size."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for block in blocks:
        block = block.strip("\n")
        if not block.strip():
            continue
        n = len(block.encode()) + len(sep)
        if current and size + n > limit:
            pieces.append(sep.join(current))
            current, size = [], 0
        current.append(block)
        size += n
    if current:
        pieces.append(sep.join(current))
    return pieces


def _piece_units(name: str, origin: Path, blocks: Iterable[str], limit: int, sep: str = "\n\n"):
    return [
        Unit(f"{name}#{i}", (lambda p=piece: p), str(origin))
        for i, piece in enumerate(_pieces(blocks, limit, sep))
    ]


def _file_units(
    root: Path, paths: Iterable[str | Path], load: Callable[[Path], str] = _read
) -> list[Unit]:
    # Symlinks are never listed (see _files), so the path itself names the source file.
    # Keys are relative, so the sample is the same on any machine with the same files.
    prefix = len(str(root)) + 1
    return [Unit(str(p)[prefix:], (lambda p=p: load(Path(p))), str(p)) for p in paths]


def _files(
    root: Path, suffixes: tuple[str, ...] = ("",), skip_dirs: Iterable[str] = ()
) -> list[str]:
    """Regular files (no symlinks: those are copies) under `root` whose names end with one of
    `suffixes`, sorted. Walks with scandir and prunes `skip_dirs` early: site-packages and
    /usr/share/man hold tens of thousands of files and a stat per file costs seconds."""
    skip = {"__pycache__", *skip_dirs}
    found: list[str] = []
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:  # missing or unreadable: an absent source, not an error
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in skip:
                    stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False) and entry.name.endswith(suffixes):
                found.append(entry.path)
    return sorted(found)  # strings: a Path per file would cost a second on /usr/share/man


# ----------------------------------------------------------------------------------------------
# Pinned sources only. A corpus made of "whatever this machine has installed" differs from
# machine to machine (a fresh machine once gave 11 licence documents where the README's run had
# 18), so a reader could not tell a different corpus from a different result. Debian files
# count only when they belong to a package the demo's install step pins, PyPI files only when
# they belong to a distribution that installing hdee[tasks] brings (pinned by constraints.txt).

DPKG_INFO_DIR = Path("/var/lib/dpkg/info")
# scripts/install-demo-sources.sh installs all but base-files, which every Debian system has
# (/usr/share/common-licenses); a test keeps the two lists equal.
DEMO_PACKAGES = (
    "base-files",
    "bible-kjv",
    "jargon-text",
    "fortunes",
    "fortunes-min",
    "dict-gcide",
    "dict-foldoc",
    "dict-devil",
    "dict-vera",
    "manpages",
    "libc6-dev",
    "locales",
    "perl-modules-5.36",
)
DEMO_DISTRIBUTION = ("hdee", ("tasks",))  # the PyPI side: this distribution and extra's closure


@cache
def _debian_files(info_dir: Path, packages: tuple[str, ...]) -> frozenset[str] | None:
    """Every file the given packages installed (dpkg's file lists); None where there is no
    dpkg database (not Debian): then every file under the source directories counts."""
    if not info_dir.is_dir():
        return None
    owned: set[str] = set()
    for package in packages:
        for listing in sorted(info_dir.glob(f"{package}.list")) + sorted(
            info_dir.glob(f"{package}:*.list")
        ):
            owned.update(listing.read_text(encoding="utf-8", errors="replace").splitlines())
    return frozenset(owned)


def _debian_only(paths: Iterable[str | Path]) -> list[str]:
    """`paths` that one of DEMO_PACKAGES installed (all of them on a system without dpkg)."""
    owned = _debian_files(DPKG_INFO_DIR, DEMO_PACKAGES)
    return [str(p) for p in paths if owned is None or str(p) in owned]


def _closure(
    distributions: dict[str, importlib.metadata.Distribution], name: str, extras: Iterable[str]
) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that `name[extras]` requires, transitively (itself too)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [(canonicalize_name(name), frozenset(extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        key, wanted = pending.pop()
        dist = distributions.get(key)
        if (key, wanted) in seen or dist is None:
            continue
        seen.add((key, wanted))
        found[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in ("", *wanted)):
                pending.append((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return found


@cache
def _python_entries(roots: tuple[Path, ...]) -> tuple[frozenset[str], dict[str, str]] | None:
    """The top-level names under `roots` (packages, modules, .dist-info directories) that
    belong to DEMO_DISTRIBUTION's closure, and {distribution: version}; None where hdee is not
    installed as a distribution there (run from a source tree): then everything counts."""
    distributions = {
        canonicalize_name(d.metadata["Name"]): d
        for d in importlib.metadata.distributions(path=[str(r) for r in roots])
        if d.metadata["Name"]
    }
    name, extras = DEMO_DISTRIBUTION
    if canonicalize_name(name) not in distributions:
        return None
    closure = _closure(distributions, name, extras)
    entries = {
        file.parts[0]
        for dist in closure.values()
        for file in dist.files or []
        if file.parts and file.parts[0] not in ("..", "__pycache__")
    }
    versions = {key: dist.version for key, dist in sorted(closure.items())}
    return frozenset(entries), versions


def _python_only(root: Path, paths: Iterable[str | Path]) -> list[str]:
    """`paths` under `root` (a site-packages directory) that DEMO_DISTRIBUTION's closure
    installed (all of them where hdee is not an installed distribution)."""
    pinned = _python_entries(SITE_PACKAGES_DIRS)
    if pinned is None:
        return [str(p) for p in paths]
    return [str(p) for p in paths if Path(p).relative_to(root).parts[0] in pinned[0]]


def source_versions() -> dict[str, dict[str, str]]:
    """The versions of what the corpus may read: {"debian": {package: version},
    "python": {distribution: version}} (empty where not known), for corpus.json."""
    debian: dict[str, str] = {}
    if shutil.which("dpkg-query"):
        listing = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Package}\\t${Version}\\t${db:Status-Abbrev}\\n"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in listing.splitlines():
            package, _, rest = line.partition("\t")
            version, _, state = rest.partition("\t")
            if package in DEMO_PACKAGES and state.startswith("ii"):
                debian[package] = version
    pinned = _python_entries(SITE_PACKAGES_DIRS)
    return {"debian": dict(sorted(debian.items())), "python": pinned[1] if pinned else {}}


# ----------------------------------------------------------------------------------------------
# Sources. Each reader returns the candidate documents of one domain ([] when absent).


def _bible(limit: int) -> list[Unit]:
    """KJV, book by book, via the `bible` program of bible-kjv (its data file is compressed
    in a format of its own). `-l 0`: one verse per line."""
    command = shutil.which(BIBLE_COMMAND)
    if command is None:
        return []
    out = subprocess.run(
        [command, "-l", "0", "gen1:1-rev22:21"], capture_output=True, check=False, timeout=60
    ).stdout.decode("utf-8", errors="replace")
    books: dict[str, list[str]] = {}
    # The output alternates "Book N" headings and verse blocks, separated by blank lines.
    blocks = [b.strip("\n") for b in out.split("\n\n") if b.strip()]
    for heading, verses in zip(blocks[0::2], blocks[1::2], strict=False):
        book = heading.rsplit(" ", 1)[0]
        books.setdefault(book, []).append(f"{heading}\n\n{verses}")
    units = []
    for book, chapters in books.items():
        units += _piece_units(f"bible/{book}", Path(command), chapters, limit)
    return units


_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


_DICTD_VALUES = {char: value for value, char in enumerate(_DICTD_DIGITS)}


def _dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _DICTD_VALUES[char]
    return value


@cache
def _dictd_spans(index: str, mtime_ns: int) -> list[tuple[int, int]]:
    """(offset, length) of every entry, in file order. Cached: parsing GCIDE's 200k index
    lines takes a second, and tests gather the corpus several times."""
    spans: set[tuple[int, int]] = set()
    for line in Path(index).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00"):  # 00-database-*: metadata
            spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))
    return sorted(spans)


def _dictd(name: str, limit: int, skip: Callable[[str], bool] = lambda entry: False) -> list[Unit]:
    """A dictd database: the .index gives every entry's offset and length in the .dict.dz
    (a gzip file); runs of consecutive entries become documents, decoded only when chosen."""
    index, data_path = DICTD_DIR / f"{name}.index", DICTD_DIR / f"{name}.dict.dz"
    if not (index.is_file() and data_path.is_file()):
        return []
    spans = _dictd_spans(str(index), index.stat().st_mtime_ns)
    runs: list[list[tuple[int, int]]] = [[]]
    size = 0
    for start, length in spans:
        if runs[-1] and size + length + 2 > limit:  # +2: the blank line between entries
            runs.append([])
            size = 0
        runs[-1].append((start, length))
        size += length + 2

    @cache
    def data() -> bytes:  # 40 MB for GCIDE: decompress once, and only if a run is chosen
        return gzip.decompress(data_path.read_bytes())

    def load(run: list[tuple[int, int]]) -> str:
        entries = (
            data()[start : start + length].decode("utf-8", "replace") for start, length in run
        )
        return "\n\n".join(e.strip("\n") for e in entries if not skip(e))

    return [
        Unit(f"{name}#{i}", (lambda run=run: load(run)), str(data_path))
        for i, run in enumerate(runs)
        if run
    ]


def _fortunes(limit: int) -> list[Unit]:
    units: list[Unit] = []
    for path in map(Path, _files(FORTUNES_DIR, skip_dirs=("off",))):
        if path.suffix in (".dat", ".u8"):
            continue
        units += _piece_units(f"fortunes/{path.name}", path, _read(path).split("\n%\n"), limit)
    return units


def _jargon(limit: int) -> list[Unit]:
    if not JARGON_TXT.is_file():
        return []
    return _piece_units("jargon", JARGON_TXT, _read(JARGON_TXT).split("\n\n"), limit)


# roff requests that carry no text of their own.
_ROFF_SILENT = set(
    "TH so de ds nr if ie el ft in ta ll ne hy nh ad na fi nf ti tr cc ig am rm rn ps vs ss "
    "mk rt bp pl wh ch it ev ns rs cu ul tm ab lf ev Dd Dt Os Bl El Bd Ed UC PD RS RE ".split()
)
_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[-+]?\d"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string interpolation
    (re.compile(r"\\\((em|en)"), "--"),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\((bu|ci)"), "*"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other special characters
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[e\\]"), r"\\"),
    (re.compile(r"\\[&|^%:,/]|\\c$"), ""),
    (re.compile(r"\\ "), " "),
]


def _roff_to_text(source: str) -> str:
    """Enough of roff/man/mdoc to get the words out: requests lose their dot, formatting
    escapes go. Not a renderer; the demo wants the text, not the layout."""
    out: list[str] = []
    skipping_to = ""  # the line that ends a macro definition or a conditional block
    for line in source.splitlines():
        if skipping_to:
            if line.strip().startswith(skipping_to):
                skipping_to = ""
            continue
        if re.match(r"[.'](de1?|am|ig)\b", line):
            skipping_to = ".."
            continue
        if re.match(r"[.'](if|ie|el)\b.*\\\{", line):
            skipping_to = ".\\}" if "\\}" not in line else ""
            continue
        if line.startswith(('.\\"', "'\\\"", '.\\"', "'''")) or line in (".", "'"):
            continue
        if line.startswith((".", "'")):
            request, _, args = line[1:].strip().partition(" ")
            if request in _ROFF_SILENT or request.startswith("\\"):
                continue
            if request in ("SH", "SS", "Sh", "Ss"):
                out += ["", args.replace('"', ""), ""]
            elif request in ("PP", "LP", "P", "sp", "br", "Pp", "TP"):
                out.append("")
            elif args:
                out.append(args.replace('"', ""))
            continue
        out.append(line)
    text = "\n".join(out)
    for pattern, replacement in _ROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return text


def _man_pages(limit: int) -> list[Unit]:
    # English pages only: the translations live in MAN_DIR/<lang>/.
    paths: list[str] = []
    for section in range(1, 9):
        paths += _files(MAN_DIR / f"man{section}", (".gz",))
    return _file_units(MAN_DIR, _debian_only(paths), lambda p: _roff_to_text(_read(p)))


def _info_manuals(limit: int) -> list[Unit]:
    units: list[Unit] = []
    for path in map(Path, _debian_only(_files(INFO_DIR, (".gz",)))):
        if ".info" not in path.name:
            continue
        nodes = []
        for node in _read(path).split("\x1f"):
            node = node.lstrip("\n")
            if node.startswith(("Tag Table:", "Indirect:", "Local Variables")):
                continue
            if node.startswith("File:"):  # the navigation line of every node
                node = node.partition("\n")[2]
            nodes.append(node)
        units += _piece_units(f"info/{path.name}", path, nodes, limit)
    return units


def _licences(limit: int) -> list[Unit]:
    units = _file_units(COMMON_LICENSES_DIR, _debian_only(_files(COMMON_LICENSES_DIR)))
    for root in SITE_PACKAGES_DIRS:
        paths = [
            p
            for dist_info in _python_only(root, sorted(root.glob("*.dist-info")))
            for p in _files(Path(dist_info))
            if os.path.basename(p).upper().startswith(("LICEN", "COPYING", "NOTICE"))
        ]
        units += _file_units(root, paths)
    if (STDLIB_DIR / "LICENSE.txt").is_file():
        units += _file_units(STDLIB_DIR, [STDLIB_DIR / "LICENSE.txt"])
    return units


def _changelogs(limit: int) -> list[Unit]:
    paths = sorted(DOC_DIR.glob("*/changelog.Debian.gz")) if DOC_DIR.is_dir() else []
    return _file_units(DOC_DIR, _debian_only(paths))


_DEBIAN_CHANGELOG = re.compile(r"\S+ \([^)]*\) [^;\n]*; urgency=")


def _upstream_changelogs(limit: int) -> list[Unit]:
    """ChangeLog / release notes of upstream projects. Debian-native packages keep a Debian
    changelog under the same name: those belong to the debian-changelogs domain's genre."""
    paths = sorted(DOC_DIR.glob("*/changelog.gz")) if DOC_DIR.is_dir() else []

    def load(path: Path) -> str:
        text = _read(path)
        return "" if _DEBIAN_CHANGELOG.match(text) else text

    return _file_units(DOC_DIR, _debian_only(p for p in paths if not p.is_symlink()), load)


def _locales(limit: int) -> list[Unit]:
    return _file_units(LOCALES_DIR, _debian_only(_files(LOCALES_DIR)))


def _c_headers(limit: int) -> list[Unit]:
    units = _file_units(INCLUDE_DIR, _debian_only(_files(INCLUDE_DIR, (".h",))))
    return units + _file_units(PY_INCLUDE_DIR, _files(PY_INCLUDE_DIR, (".h",)))


_TEST_DIRS = ("test", "tests", "idle_test", "testing")
_SITE_SKIP = ("__pycache__", "site-packages", "dist-packages", "include", "lib", "bin")


def _python_code(limit: int) -> list[Unit]:
    # pydoc_data holds the python-docs domain's text, not code.
    skip = (*_TEST_DIRS, "site-packages", "dist-packages", "pydoc_data")
    paths = _files(STDLIB_DIR, (".py",), skip_dirs=skip)
    return _file_units(STDLIB_DIR, paths)


def _python_tests(limit: int) -> list[Unit]:
    return _file_units(STDLIB_DIR, _files(STDLIB_DIR / "test", (".py",)))


def _python_docs(limit: int) -> list[Unit]:
    """The language reference's topics that `help()` shows (pydoc_data/topics.py): the
    Python documentation that every Python installation carries."""
    path = STDLIB_DIR / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    topics: dict[str, str] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "topics":
            topics = ast.literal_eval(node.value)
    units: list[Unit] = []
    for name in sorted(topics):
        units += _piece_units(f"pydoc/{name}", path, topics[name].split("\n\n"), limit)
    return units


def _readme_of(path: Path) -> str:
    """The long description of a PyPI package: the body after the METADATA headers."""
    return _read(path).partition("\n\n")[2]


def _package_readmes(limit: int) -> list[Unit]:
    units: list[Unit] = []
    for root in SITE_PACKAGES_DIRS:
        paths = sorted(root.glob("*.dist-info/METADATA")) if root.is_dir() else []
        units += _file_units(root, _python_only(root, paths), _readme_of)
    return units


def _debian_readmes(limit: int) -> list[Unit]:
    if not DOC_DIR.is_dir():
        return []
    paths = sorted(
        p
        for pattern in ("*/README*", "*/NEWS*")
        for p in DOC_DIR.glob(pattern)
        if p.is_file() and not p.is_symlink() and p.suffix in ("", ".gz", ".txt", ".md", ".Debian")
    )
    return _file_units(DOC_DIR, _debian_only(paths))


def _pod_of(path: Path) -> str:
    """The POD documentation in a Perl module: the lines from a `=head`/`=pod` to `=cut`."""
    out: list[str] = []
    inside = False
    for line in _read(path).splitlines():
        if line.startswith("=cut"):
            inside = False
        elif line.startswith("="):
            inside = True
            out.append(line.split(" ", 1)[1] if " " in line else "")
        elif inside:
            out.append(line)
    return "\n".join(out)


def _perl_docs(limit: int) -> list[Unit]:
    # Every Perl module of perl-modules documents itself in POD: prose about programming.
    return [
        unit
        for root in PERL_DIRS
        for unit in _file_units(root, _debian_only(_files(root, (".pm", ".pod"))), _pod_of)
    ]


# General corpus: a mix of code, prose and reference text from files no domain uses.


def _site_code(limit: int) -> list[Unit]:
    skip = (*_TEST_DIRS, *_SITE_SKIP)
    return [
        unit
        for root in SITE_PACKAGES_DIRS
        for unit in _file_units(root, _python_only(root, _files(root, (".py",), skip)))
    ]


def _site_docs(limit: int) -> list[Unit]:
    units: list[Unit] = []
    for root in SITE_PACKAGES_DIRS:
        paths = _files(root, (".md", ".rst", ".txt"), skip_dirs=(*_TEST_DIRS, *_SITE_SKIP))
        paths = [p for p in paths if "-info" not in p[len(str(root)) :]]
        units += _file_units(root, _python_only(root, paths))
    return units


def _copyrights(limit: int) -> list[Unit]:
    paths = sorted(DOC_DIR.glob("*/copyright")) if DOC_DIR.is_dir() else []
    return _file_units(DOC_DIR, _debian_only(p for p in paths if not p.is_symlink()))


@dataclass(frozen=True)
class DomainSpec:
    name: str
    expected: str
    read: Callable[[int], list[Unit]]
    source: str
    packages: tuple[str, ...] = ()  # Debian packages that provide it; () = comes with Python
    missing_hint: str = ""


def _apt_hint(*packages: str) -> str:
    return f"apt-get install {' '.join(packages)} (or run {INSTALL_SCRIPT})"


# Expected classes follow the zlib compression ratio of a quick corpus (docs/demo.md); the
# seeds' perplexity decides the real ones. In each class, earlier entries are preferred: the
# first three train, the next are held out; a class short of sources borrows from the others.
# Entries without a Debian package come with Python or with every Debian system, so a machine
# without the demo's packages still gets a full demo.
CATALOGUE: tuple[DomainSpec, ...] = (
    DomainSpec("licenses", "easy", _licences, "licence texts: Debian common-licenses, PyPI"),
    DomainSpec("man-pages", "easy", _man_pages, "manual pages (roff stripped)", ("manpages",)),
    DomainSpec("c-headers", "easy", _c_headers, "C headers: libc, Python", ("libc6-dev",)),
    DomainSpec("locales", "easy", _locales, "glibc locale definitions", ("locales",)),
    DomainSpec("python-tests", "easy", _python_tests, "Python standard library tests"),
    DomainSpec("bible", "moderate", _bible, "King James Bible", ("bible-kjv",)),
    DomainSpec(
        "gcide",
        "moderate",
        lambda n: _dictd("gcide", n),
        "GCIDE dictionary (Webster's 1913 + WordNet)",
        ("dict-gcide",),
    ),
    DomainSpec("python-code", "moderate", _python_code, "Python standard library source"),
    DomainSpec("debian-changelogs", "moderate", _changelogs, "Debian package changelogs"),
    DomainSpec("python-docs", "moderate", _python_docs, "Python language reference topics"),
    DomainSpec("info-manuals", "moderate", _info_manuals, "GNU info manuals"),
    DomainSpec(
        "perl-docs",
        "moderate",
        _perl_docs,
        "Perl module documentation (POD)",
        ("perl-modules-5.36",),
    ),
    DomainSpec(
        "vera", "moderate", lambda n: _dictd("vera", n), "V.E.R.A. acronyms", ("dict-vera",)
    ),
    DomainSpec("jargon", "difficult", _jargon, "the Jargon File 4.4.7", ("jargon-text",)),
    DomainSpec("fortunes", "difficult", _fortunes, "fortune cookies", ("fortunes", "fortunes-min")),
    DomainSpec(
        "devil",
        "difficult",
        lambda n: _dictd("devil", n),
        "The Devil's Dictionary (Bierce)",
        ("dict-devil",),
    ),
    # FOLDOC copies many Jargon File entries; those would leak the jargon domain's text.
    DomainSpec(
        "foldoc",
        "difficult",
        lambda n: _dictd("foldoc", n, skip=lambda e: "Jargon File" in e),
        "Free On-line Dictionary of Computing",
        ("dict-foldoc",),
    ),
    DomainSpec("debian-readmes", "difficult", _debian_readmes, "Debian READMEs and NEWS files"),
    DomainSpec(
        "upstream-changelogs",
        "difficult",
        _upstream_changelogs,
        "upstream ChangeLogs in Debian docs",
    ),
)

# The general corpus (seeds): an equal share of its bytes per source; a missing source leaves
# its share to the rest.
GENERAL_SOURCES: tuple[DomainSpec, ...] = (
    DomainSpec("site-code", "general", _site_code, "Python code of installed PyPI packages"),
    DomainSpec("package-readmes", "general", _package_readmes, "PyPI package descriptions"),
    DomainSpec("site-docs", "general", _site_docs, "text files shipped in PyPI packages"),
    DomainSpec("copyrights", "general", _copyrights, "Debian copyright files"),
)


# ----------------------------------------------------------------------------------------------
# Gathering


def _order(units: list[Unit]) -> list[Unit]:
    """A deterministic shuffle: a sample spread over the whole source, not its first files."""
    return sorted(units, key=lambda u: hashlib.sha256(u.key.encode()).hexdigest())


def _text_hash(text: str) -> str:
    # Whitespace-insensitive, so a re-wrapped copy of a document still counts as the same.
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()


@dataclass
class _Gatherer:
    """Picks documents for one corpus after another, never reusing a source file or a text."""

    doc_bytes: int
    seen_texts: set[str] = field(default_factory=set)
    owners: dict[str, str] = field(default_factory=dict)  # source file -> corpus that used it

    def take(self, corpus: str, units: list[Unit], budget: int) -> list[str]:
        docs: list[str] = []
        size = 0
        for unit in _order(units):
            if size >= budget:
                break
            if self.owners.get(unit.origin, corpus) != corpus:
                continue
            try:
                text = _clean(_truncate(_clean(unit.load()), self.doc_bytes))
            except (OSError, ValueError, EOFError, zlib.error) as error:
                log.debug("demo corpus: skipping %s (%s)", unit.key, error)
                continue
            if len(text.encode()) < MIN_DOC_BYTES:
                continue
            digest = _text_hash(text)
            if digest in self.seen_texts:
                continue
            self.seen_texts.add(digest)
            self.owners[unit.origin] = corpus
            docs.append(text)
            size += len(text.encode())
        return docs


def _missing(spec: DomainSpec, found: int) -> MissingSource:
    if found:
        how = f"only {found} documents found (after removing text used elsewhere)"
    elif spec.packages:
        how = (
            f"Debian package {' / '.join(spec.packages)} not installed; {_apt_hint(*spec.packages)}"
        )
    else:
        how = f"no {spec.source} found under {STDLIB_DIR} or {', '.join(map(str, SITE_PACKAGES_DIRS))}"
    return MissingSource(spec.name, spec.packages, f"demo corpus: skipping '{spec.name}': {how}")


def _select(
    gathered: list[DomainSpec], iterations: int, held_out_per_class: int
) -> tuple[list[str], list[str]]:
    """Trained and held-out domain names: `iterations` trained and `held_out_per_class`
    held-out ones per expected class, in catalogue order; a class short of domains borrows
    from the others, so the totals stay the same while enough domains exist."""
    queues = {cls: [s.name for s in gathered if s.expected == cls] for cls in CLASSES}

    def pick(rounds: int) -> list[str]:
        names = [q.pop(0) for _ in range(rounds) for q in queues.values() if q]
        leftovers = [n for s in gathered for n in [s.name] if n in queues[s.expected]]
        for name in leftovers[: rounds * len(CLASSES) - len(names)]:
            queues[next(s.expected for s in gathered if s.name == name)].remove(name)
            names.append(name)
        return names

    trained = pick(iterations)
    held_out = pick(held_out_per_class)
    if not held_out and len(trained) > len(CLASSES):
        held_out.append(trained.pop())  # a demo without a held-out domain shows too little
    return trained, held_out


def _write(directory: Path, docs: list[str]) -> None:
    directory.mkdir(parents=True)
    for i, text in enumerate(docs):
        (directory / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")


def _describe(name: str, path: Path, spec: DomainSpec, held_out: bool, docs: list[str]):
    raw = "\n\n".join(docs).encode()
    return DemoDomain(
        name=name,
        path=path,
        expected=spec.expected,
        held_out=held_out,
        source=spec.source,
        packages=spec.packages,
        documents=len(docs),
        bytes=len(raw),
        zlib_ratio=round(len(zlib.compress(raw, 9)) / max(len(raw), 1), 4),
    )


def gather_demo_corpus(
    out_dir: Path,
    quick: bool = False,
    max_bytes_per_domain: int | None = None,
    general_bytes: int | None = None,
    iterations: int = 3,
    held_out_per_class: int | None = None,
) -> DemoCorpus:
    """Write the demo corpus to `out_dir` (replacing what was there) and describe it.

    Layout: `out_dir/general/NNNN.txt`, `out_dir/domains/<name>/NNNN.txt` (one document per
    file) and `out_dir/corpus.json`. `iterations` x 3 trained domains and `held_out_per_class`
    x 3 held-out ones (default 1 quick, 2 full) while the sources allow. Sizes: about
    `max_bytes_per_domain` bytes per domain (default 150 KB quick, 1 MB full) and
    `general_bytes` for the general corpus (default 3x a domain). Missing sources are logged
    and listed in `DemoCorpus.missing`; DemoCorpusError when fewer than 3 trained and 1
    held-out domain remain.
    """
    out_dir = Path(out_dir)
    budget = max_bytes_per_domain or (QUICK_BYTES_PER_DOMAIN if quick else FULL_BYTES_PER_DOMAIN)
    general_budget = general_bytes or 3 * budget
    if held_out_per_class is None:
        held_out_per_class = 1 if quick else 2
    gatherer = _Gatherer(doc_bytes=max(2_000, min(MAX_DOC_BYTES, budget // DOCS_PER_DOMAIN)))
    wanted = (iterations + held_out_per_class) * len(CLASSES)

    # Domains first, in catalogue order, so the preferred ones get first claim on shared text;
    # sources are only read until enough domains are gathered.
    gathered: list[DomainSpec] = []
    docs_of: dict[str, list[str]] = {}
    missing: list[MissingSource] = []
    for spec in CATALOGUE:
        per_class = sum(s.expected == spec.expected for s in gathered)
        if len(gathered) >= wanted or per_class >= iterations + held_out_per_class:
            continue
        docs = gatherer.take(spec.name, spec.read(gatherer.doc_bytes), budget)
        if len(docs) < 10:  # too few to split 80/10/10 by document: as good as missing
            missing.append(_missing(spec, found=len(docs)))
            warn(missing[-1].message)
            continue
        gathered.append(spec)
        docs_of[spec.name] = docs
    # Fill a class that came up short with what the others have left.
    for spec in CATALOGUE:
        if len(gathered) >= wanted:
            break
        if spec.name in docs_of or any(m.domain == spec.name for m in missing):
            continue
        docs = gatherer.take(spec.name, spec.read(gatherer.doc_bytes), budget)
        if len(docs) >= 10:
            gathered.append(spec)
            docs_of[spec.name] = docs
    trained, held_out = _select(gathered, iterations, held_out_per_class)

    general_docs: list[str] = []
    general_sources = []
    for i, spec in enumerate(GENERAL_SOURCES):
        left = general_budget - sum(len(d.encode()) for d in general_docs)
        docs = gatherer.take(
            "general", spec.read(gatherer.doc_bytes), left // (len(GENERAL_SOURCES) - i)
        )
        if docs:
            general_sources.append(spec.source)
        general_docs += docs
    general_spec = DomainSpec("general", "general", _site_code, "; ".join(general_sources))

    with atomic_directory(out_dir) as tmp:
        specs = {spec.name: spec for spec in gathered}
        domains = []
        for name in [*trained, *held_out]:
            _write(tmp / "domains" / name, docs_of[name])
            path = out_dir / "domains" / name
            domains.append(_describe(name, path, specs[name], name in held_out, docs_of[name]))
        _write(tmp / "general", general_docs)
        general = _describe("general", out_dir / "general", general_spec, False, general_docs)
        corpus = DemoCorpus(
            root=out_dir,
            quick=quick,
            general=general,
            domains=tuple(domains),
            missing=tuple(missing),
            unused=tuple(s.name for s in gathered if s.name not in (*trained, *held_out)),
            versions=source_versions(),
        )
        if len(trained) < 3 or not held_out or general.documents < 10:
            raise DemoCorpusError(
                f"demo corpus: only {len(trained)} trained and {len(held_out)} held-out domains "
                f"and {general.documents} general documents could be gathered (the demo needs "
                f"3, 1 and 10). Install its text sources: {_apt_hint(*_all_packages())}"
            )
        write_json(tmp / "corpus.json", corpus.to_dict())
    return corpus


def _all_packages() -> list[str]:
    return sorted({p for spec in CATALOGUE for p in spec.packages})


# ----------------------------------------------------------------------------------------------
# The experiment config


def demo_config(corpus: DemoCorpus, run_dir: Path, quick: bool) -> dict[str, Any]:
    """An experiment config (for `hdee.config.parse_config`) over the gathered corpus: tiny
    Llama models, a small BPE, the paper's three configurations with step counts scaled down."""
    iterations = max(1, len(corpus.trained) // len(CLASSES))
    # The baseline's expert steps (the paper's 400 scaled down); a multiple of 4 so that 3/4 and
    # 5/4 of it are whole and the three configurations' budgets are exactly equal.
    base = 40 if quick else 80
    low, high = base * 3 // 4, base * 5 // 4
    configurations = [
        {
            "name": "MHo-IHo",
            "sizes": dict.fromkeys(CLASSES, "M"),
            "steps": dict.fromkeys(CLASSES, base),
        },
        {
            "name": "MHo-IHe",
            "sizes": dict.fromkeys(CLASSES, "M"),
            "steps": {"easy": low, "moderate": base, "difficult": high},
        },
        {
            "name": "MHe-IHo",
            "sizes": {"easy": "S", "moderate": "M", "difficult": "L"},
            "steps": dict.fromkeys(CLASSES, base),
        },
    ]

    def corpus_entry(domain: DemoDomain) -> dict[str, Any]:
        return {"name": domain.name, "source": {"type": "local", "paths": [str(domain.path)]}}

    seed_steps = 150 if quick else 300
    return {
        "run_dir": str(run_dir),
        "seed": 0,
        "data": {
            "tokenizer": {"kind": "bpe", "vocab_size": 2048 if quick else 4096},
            "seq_len": 64 if quick else 128,
            "general": corpus_entry(corpus.general),
            "domains": [corpus_entry(d) for d in corpus.domains],
            "num_workers": 2,
        },
        "model": {"preset": "tiny"},
        "seeds": {
            "training": {
                "steps": seed_steps,
                "batch_size": 16,
                "lr": 3e-3,
                "min_lr": 3e-4,
                "warmup_steps": seed_steps // 10,
                "eval_every": seed_steps // 2,
                "eval_batches": 4,
                "checkpoint_every": seed_steps // 2,
            }
        },
        "experts": {
            "training": {
                "steps": base,
                "batch_size": 16,
                "lr": 1e-3,
                "min_lr": 5e-4,
                "warmup_steps": max(1, base // 10),
                "eval_every": base,
                "eval_batches": 4,
                "checkpoint_every": base,
            }
        },
        "difficulty": {"method": "tercile", "eval_batches": 8},
        "plan": {
            "iterations": iterations,
            "held_out": [d.name for d in corpus.held_out],
            "configurations": configurations,
            "baseline": "MHo-IHo",
        },
        "evaluation": {
            "cached_prior_sequences": 16 if quick else 64,
            "max_test_sequences": 32 if quick else 128,
            "batch_size": 16,
            # Every iteration's experts on every domain: the report's forgetting table.
            "every_iteration": True,
        },
        # One job at a time on every core: two single-threaded workers were ~20% faster per
        # pair of jobs, but left a core idle whenever one job remained (3 seeds on 2 cores).
        "runner": {"workers": 1},
    }
