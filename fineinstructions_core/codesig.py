"""The code a stage runs, found from its function rather than kept by hand, hashed for its signature.

Starting from a stage's function, the project functions and classes it names are followed
transitively: names resolved in the function's module, attributes of project modules
(`judge.build_request`), imports inside the function body, members reached through a parameter
annotated with a project class (`ctx.finish` for `ctx: StageContext`), and the values of the
module-level constants it reads (prompt texts, column lists). Each function's syntax tree is hashed
without docstrings or comments, so editing either never makes a stage stale, while editing its logic,
or a constant it reads, does. A named class is covered whole (its methods' calls are not typed).
"""

from __future__ import annotations

import ast
import builtins
import enum
import hashlib
import importlib
import inspect
import re
import textwrap
import types
from collections.abc import Callable, Iterator
from typing import Any

PROJECT_PACKAGE = "fineinstructions_core"
_PLAIN = (str, bytes, int, float, bool, type(None))
_SOURCE_CACHE: dict[Any, str] = {}
_TREE_CACHE: dict[Any, ast.AST | None] = {}


def code_signature(*roots: Callable[..., Any]) -> str:
    """A hash of the code and constants reachable from `roots` (see the module docstring)."""
    h = hashlib.sha256()
    for kind, name, blob in sorted(_reachable(roots)):
        h.update(f"{kind}:{name}\0".encode())
        h.update(blob.encode())
    return h.hexdigest()[:24]


def reachable_names(*roots: Callable[..., Any]) -> list[str]:
    """The qualified names of the functions, classes and constants the signature covers (for reports)."""
    return sorted({name for _, name, _ in _reachable(roots)})


def _is_project(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == PROJECT_PACKAGE or module.startswith(PROJECT_PACKAGE + ".")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _reachable(roots: tuple[Callable[..., Any], ...]) -> set[tuple[str, str, str]]:
    seen: set[int] = set()
    out: set[tuple[str, str, str]] = set()
    stack: list[Any] = [inspect.unwrap(r) for r in roots]
    first = {id(s) for s in stack}
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.ModuleType):
            continue
        if not (id(obj) in first or _is_project(obj)):
            continue
        if inspect.isclass(obj):
            out.add(("class", _qualname(obj), _tree_text(obj)))
            for member in vars(obj).values():
                fn = _function_of(member)
                if fn is not None:
                    stack.extend(_references(fn))
            continue
        fn = _function_of(obj)
        if fn is None:
            continue
        out.add(("function", _qualname(fn), _tree_text(fn)))
        for ref in _references(fn):
            if isinstance(ref, _Constant):
                out.add(("constant", ref.name, ref.text))
            else:
                stack.append(ref)
    return out


def _function_of(member: Any) -> types.FunctionType | None:
    """The plain function behind a function, method, static/class method or property getter."""
    if isinstance(member, staticmethod | classmethod):
        member = member.__func__
    if isinstance(member, property):
        member = member.fget
    member = inspect.unwrap(member) if callable(member) else member
    return member if isinstance(member, types.FunctionType) else None


def _tree_text(obj: Any) -> str:
    """The syntax tree of a function or class, without docstrings (comments never reach the tree)."""
    if obj not in _SOURCE_CACHE:
        tree = _parsed(obj)
        _SOURCE_CACHE[obj] = (
            repr(getattr(obj, "__code__", obj)) if tree is None else ast.dump(tree, annotate_fields=False)
        )
    return _SOURCE_CACHE[obj]


def _parsed(obj: Any) -> ast.AST | None:
    """A function's or class's source parsed once, docstrings removed (None where there is no source)."""
    if obj in _TREE_CACHE:
        return _TREE_CACHE[obj]
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):
        tree = None
    else:
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module)
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    _TREE_CACHE[obj] = tree
    return tree


class _Constant:
    """A module-level value a function reads, hashed by value: an edited or patched prompt counts."""

    def __init__(self, name: str, value: Any):
        self.name = name
        self.text = _value_text(value)


def _value_text(value: Any, depth: int = 0) -> str:
    if depth > 6:
        return "..."
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, re.Pattern):
        return f"re({value.pattern!r},{value.flags})"
    if isinstance(value, enum.Enum):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value_text(v, depth + 1) for v in value) + "]"
    if isinstance(value, set | frozenset):
        return "{" + ",".join(sorted(_value_text(v, depth + 1) for v in value)) + "}"
    if isinstance(value, dict):
        items = sorted((_value_text(k, depth + 1), _value_text(v, depth + 1)) for k, v in value.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    return ""  # objects that are not data (loggers, locks, caches) say nothing about behaviour


_CONSTANT_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _is_data(value: Any, name: str) -> bool:
    """Immutable data always counts; a list, dict or set only under a constant's name (PROMPT, FEW_SHOT),
    since private mutable module state (a cache of loaded models) says nothing about behaviour."""
    if isinstance(value, _PLAIN + (re.Pattern, enum.Enum, tuple, frozenset)):
        return True
    return isinstance(value, list | dict | set) and bool(_CONSTANT_NAME.match(name))


def _annotation_classes(fn: types.FunctionType) -> dict[str, Any]:
    """Parameters annotated with a project class: attribute uses on them resolve to its members."""
    out = {}
    for name, param in inspect.signature(fn).parameters.items():
        ann = param.annotation
        if isinstance(ann, str):
            ann = fn.__globals__.get(ann.split("[")[0].split("|")[0].strip().strip("'\""))
        if inspect.isclass(ann) and _is_project(ann):
            out[name] = ann
    return out


def _references(fn: types.FunctionType) -> Iterator[Any]:
    """The project objects and module-level constants a function's body names. Resolved afresh on every
    call (a patched prompt or function must count); only the parsed source is kept per function."""
    tree = _parsed(fn)
    if tree is None:
        return
    scope = dict(vars(builtins)) | fn.__globals__
    if fn.__closure__:
        scope |= {
            name: cell.cell_contents
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__, strict=True)
            if _cell_filled(cell)
        }
    typed = _annotation_classes(fn)
    package = (fn.__module__ or "").rpartition(".")[0]
    for node in _walk_code(tree):
        if isinstance(node, ast.ImportFrom):
            yield from _imported(node, package)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain = _attribute_chain(node)
            if chain and chain[0] in typed:
                member = inspect.getattr_static(typed[chain[0]], chain[1], None) if len(chain) > 1 else None
                if member is not None and _function_of(member) is not None:
                    yield _function_of(member)
            elif chain and chain[0] in scope:
                yield from _resolve_chain(scope[chain[0]], chain, fn)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in fn.__globals__:
            value = fn.__globals__[node.id]
            if _is_data(value, node.id):
                yield _Constant(f"{fn.__module__}.{node.id}", value)
            elif not isinstance(value, types.ModuleType):
                yield value


def _walk_code(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but type annotations: a class named only in a hint is not code the function runs."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for name, child in ast.iter_fields(node):
            if name in ("annotation", "returns") and isinstance(
                node, ast.arg | ast.FunctionDef | ast.AsyncFunctionDef | ast.AnnAssign
            ):
                continue
            if isinstance(child, ast.AST):
                stack.append(child)
            elif isinstance(child, list):
                stack.extend(c for c in child if isinstance(c, ast.AST))


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _attribute_chain(node: ast.Attribute) -> list[str]:
    parts: list[str] = []
    cur: ast.AST = node
    while isinstance(cur, ast.Attribute):
        parts.append(cur.attr)
        cur = cur.value
    if not isinstance(cur, ast.Name):
        return []
    return [cur.id, *reversed(parts)]


def _resolve_chain(obj: Any, chain: list[str], fn: types.FunctionType) -> Iterator[Any]:
    """`judge.build_request` -> the function; `judge.PROMPT` -> a constant; stops at non-project objects."""
    for i, part in enumerate(chain[1:], start=1):
        if not isinstance(obj, types.ModuleType) or not obj.__name__.startswith(PROJECT_PACKAGE):
            break
        if not hasattr(obj, part):
            break
        nxt = getattr(obj, part)
        if _is_data(nxt, part):
            yield _Constant(f"{obj.__name__}.{'.'.join(chain[1 : i + 1])}", nxt)
            return
        obj = nxt
    if not isinstance(obj, types.ModuleType):
        yield obj


def _imported(node: ast.ImportFrom, package: str) -> Iterator[Any]:
    """`from .transformers_backend import TransformersBackend` inside a function: the names it imports."""
    name = node.module or ""
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
        name = ".".join(base + ([node.module] if node.module else []))
    if not name.startswith(PROJECT_PACKAGE):
        return
    try:
        module = importlib.import_module(name)
    except ImportError:
        return
    for alias in node.names:
        value = getattr(module, alias.name, None)
        if value is None:
            try:
                value = importlib.import_module(f"{name}.{alias.name}")
            except ImportError:
                continue
        if not isinstance(value, types.ModuleType):
            yield value
