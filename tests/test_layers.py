"""The house rules the import graph must keep: layers only look down, no import circles, small modules.

Every import counts, at top level or inside a function (and under TYPE_CHECKING): a lazy import is still a
dependency. docs/ARCHITECTURE.md states the same order; the last test keeps the two in step.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# lowest first; packages on one level must not import each other
LAYERS: list[tuple[str, ...]] = [
    ("infra",), ("contracts",), ("streams", "feature_repo"), ("models",), ("jobs",), ("serving",), ("bench", "ugt"),
]
LEVEL = {pkg: i for i, level in enumerate(LAYERS) for pkg in level}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def package_files() -> Iterator[tuple[str, Path]]:
    for pkg in LEVEL:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


MODULES = dict(package_files())


def resolve(name: str) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (``pkg.mod.func`` -> ``pkg.mod``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    return None


def imports_of(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module of ours, line) for every import statement anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            found = resolve(target)
            if found is not None and found != module:
                yield found, node.lineno


GRAPH = {module: sorted(set(imports_of(module, path))) for module, path in MODULES.items()}


def test_layers_only_look_down() -> None:
    upward = []
    for module, targets in GRAPH.items():
        mine = module.split(".")[0]
        for target, line in targets:
            theirs = target.split(".")[0]
            if theirs != mine and LEVEL[theirs] >= LEVEL[mine]:
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "imports that do not look down the layers " + " < ".join("|".join(lv) for lv in LAYERS) + \
        ":\n" + "\n".join(upward)


def strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles() -> None:
    graph = {module: [target for target, _ in targets] for module, targets in GRAPH.items()}
    circles = strongly_connected(graph)
    assert not circles, "modules that import each other (directly or round a circle): " + "; ".join(
        " <-> ".join(c) for c in circles)


def test_circle_finder_finds_a_circle() -> None:
    assert strongly_connected({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert strongly_connected({"a": ["b"], "b": []}) == []


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for path in MODULES.values():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines (> {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_architecture_doc_states_the_enforced_layers() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    stated = re.search(r"^Layers, lowest first: `([^`]+)`", doc, re.MULTILINE)
    assert stated, "docs/ARCHITECTURE.md must state the layer order as: Layers, lowest first: `a < b | c < ...`"
    levels = [tuple(p.strip() for p in level.split("|")) for level in stated.group(1).split("<")]
    assert levels == [tuple(level) for level in LAYERS]
    for folder in re.findall(r"^\| `([a-z_]+)/` \|", doc, re.MULTILINE):
        assert (ROOT / folder).is_dir(), f"docs/ARCHITECTURE.md names a folder {folder}/ that does not exist"
