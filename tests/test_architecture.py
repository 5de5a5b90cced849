"""The shape of the package: imports run one way, and only layout.py builds run-directory paths.

Read from the source (ast), so the checks hold for lazy imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hdee"

# File and directory names inside a run / job directory: only hdee.layout may spell them.
RUN_DIRECTORY_NAMES = {
    "final",
    "result.json",
    "spec.json",
    "checkpoints",
    "metrics.jsonl",
    "tensorboard",
    "train.log",
    "plan.json",
    "results.json",
    "results.csv",
    "difficulty.json",
    "difficulty.png",
    "report.md",
    "config.yaml",
    "run.lock",
    "discovery.json",
    "transform.json",
    "transform.safetensors",
    "assignment.safetensors",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def hdee_imports(path: Path) -> set[str]:
    """Every hdee module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hdee"):
            found.add(node.module)
            for alias in node.names:  # `from hdee.data import packing` imports a module too
                candidate = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("hdee")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: hdee_imports(path) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return path[path.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert "hdee.pipeline" in graph and graph["hdee.pipeline"], "the graph was not read"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def path_literals(source: str) -> list[tuple[int, str]]:
    """(line, name) of every run-directory file name used to build a path: `x / "name"`,
    `Path("name")`, `x.joinpath("name")` or `open("name")` (a word like "final" elsewhere, e.g.
    a record's value, is not a path)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        operands: list[ast.expr] = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands = [node.left, node.right]
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name in ("Path", "joinpath", "open"):
                operands = list(node.args)
        for operand in operands:
            if isinstance(operand, ast.Constant) and operand.value in RUN_DIRECTORY_NAMES:
                found.append((operand.lineno, operand.value))
    return found


def test_path_literals_are_found() -> None:
    source = 'a = root / "final"\nb = Path("plan.json")\nc = x.joinpath("spec.json")\nd = "final"'
    assert path_literals(source) == [(1, "final"), (2, "plan.json"), (3, "spec.json")]


def test_only_layout_names_files_of_a_run_directory() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line} {name!r}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "layout.py"
        for line, name in path_literals(path.read_text())
    ]
    assert offenders == []
