"""The package layout: no import circle between the toolkit's modules, counting the imports made
inside functions (a circle there only waits for the first call that takes it)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("infra", "model", "dataset", "trainer", "evaluation", "webdemo")


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p
            for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py") if p.name != "__init__.py"}


def _edges(path: Path, known: set[str]) -> set[str]:
    """The toolkit modules ``path`` imports anywhere in it (module level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        out.update(n for n in names if n in known)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None
    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle_counting_local_imports():
    mods = _modules()
    graph = {m: _edges(p, set(mods)) - {m} for m, p in mods.items()}
    assert len(graph) > 40 and graph["model.checkpoint"] >= {"model.vlm"}  # the walk sees the real modules
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_circle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


MAX_FUNCTION_LINES = 100


def test_no_function_is_longer_than_a_screenful():
    """Long functions hide what they do: every product function (packages and stage scripts) stays
    within MAX_FUNCTION_LINES, docstring included."""
    files = list(_modules().values()) + sorted(ROOT.glob("*.py"))
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert len(files) > 45 and not long, long
