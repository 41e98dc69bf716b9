"""The import graph of fineinstructions_core: no cycles, no Dagster, no module reaching into another's
private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fineinstructions_core"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) for every import in the file, relative ones resolved, lazy ones included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names]))
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, list[str]]]]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    raw = {}
    for mod, path in files.items():
        raw[mod] = _imports(path)
        for target, names in raw[mod]:
            if target in files:
                edges[mod].add(target)
            for n in names:  # `from . import stages` imports a module
                if f"{target}.{n}" in files:
                    edges[mod].add(f"{target}.{n}")
    return edges, raw


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            # a package's __init__ importing its own submodules is not a cycle through them
            if m.startswith(n + ".") and n in edges:
                continue
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_core():
    edges, _ = _graph()
    assert len(edges) > 20
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges) or [])}"


def test_cycle_detection_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_core_never_imports_dagster_nor_private_names_of_other_modules():
    _, raw = _graph()
    for mod, imports in raw.items():
        for target, names in imports:
            assert not target.startswith("dagster"), f"{mod} imports {target}"
            if target.startswith("fineinstructions_core") and target != mod:
                private = [n for n in names if n.startswith("_") and n != "__future__"]
                assert not private, f"{mod} imports private names {private} from {target}"
