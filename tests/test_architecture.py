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


# Modules that load or run a model; the presentation layer (report.py) reaches none of them.
MODEL_LOADERS = {
    "hdee.model",
    "hdee.scoring",
    "hdee.train",
    "hdee.evaluate",
    "hdee.inference",
    "hdee.hf_ensemble",
    "hdee.generate",
    "hdee.export",
    "hdee.tasks",
}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        for child in graph.get(stack.pop(), ()):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def test_the_report_imports_nothing_that_loads_a_model() -> None:
    graph = import_graph()
    assert "hdee.records" in reachable(graph, "hdee.report"), "the graph was not read"
    assert reachable(graph, "hdee.report") & MODEL_LOADERS == set()


def test_runners_share_only_the_base_runner_module() -> None:
    """A runner module imports hdee.runners.base, never another runner (so a new runner is one
    new file), and no module imports a private name of a runner module."""
    runners = {
        m for m in import_graph() if m.startswith("hdee.runners.") and m != "hdee.runners.base"
    }
    graph = import_graph()
    for runner in runners:
        assert graph[runner] & runners == set(), runner
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hdee.runners."):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert private == [], f"{path.name} imports {private} from {node.module}"


MAX_FUNCTION_LINES = 100


def function_lengths() -> list[tuple[int, str]]:
    lengths = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                lengths.append((size, f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}"))
    return sorted(lengths, reverse=True)


def test_no_function_is_longer_than_a_screenful_or_two() -> None:
    lengths = function_lengths()
    assert len(lengths) > 100, "the functions were not read"
    too_long = [f"{where} ({size} lines)" for size, where in lengths if size > MAX_FUNCTION_LINES]
    assert too_long == []


def longest_import_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest path of the (acyclic) import graph, for the architecture notes."""
    best: dict[str, list[str]] = {}

    def chain(node: str) -> list[str]:
        if node not in best:
            tails = [chain(child) for child in graph.get(node, ())]
            best[node] = [node, *max(tails, key=len, default=[])]
        return best[node]

    return max((chain(node) for node in graph), key=len)


def test_method_names_are_spelt_in_the_method_table_only() -> None:
    """Only ensemble.py (the table), config.py (its documentation) and records' comments may
    name the ensembling methods: everything else reads hdee.ensemble.METHODS."""
    names = {"uniform_prior", "cached_prior", "simple_average"}
    allowed = {"ensemble.py", "config.py"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert offenders == []
