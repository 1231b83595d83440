"""Static checks of the package: nothing is deserialised with pickle (or joblib / torch.load
without weights_only=True), and no SQL is built from f-strings, concatenation or formatting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "allocsvc"
SQL_METHODS = {"execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare", "cursor"}
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal"}


def sources() -> list[tuple[Path, ast.Module]]:
    files = [p for p in PACKAGE.rglob("*.py") if "_proto" not in p.parts]
    assert len(files) > 20
    return [(p, ast.parse(p.read_text(), str(p))) for p in files]


def _built(node: ast.expr) -> bool:
    """An expression that builds text at run time (f-string, +, %, .format)."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
        return True
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
    )


def test_nothing_is_unpickled() -> None:
    found = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(path, a.name) for a in node.names if a.name in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and node.module in UNSAFE_MODULES:
                found.append((path, node.module))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                safe = any(
                    k.arg == "weights_only"
                    and isinstance(k.value, ast.Constant)
                    and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    found.append(
                        (path, f"torch.load without weights_only=True, line {node.lineno}")
                    )
    assert found == []


def _constants(tree: ast.Module) -> set[str]:
    """Module-level names bound once to a literal string (column lists and the like)."""
    return {
        t.id
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for t in node.targets
        if isinstance(t, ast.Name)
    }


def _literal_only_parameters(tree: ast.Module) -> set[tuple[str, str]]:
    """(function, parameter) pairs where every call in the module passes a literal string."""
    calls: dict[str, list[ast.Call]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else None
            name = node.func.id if isinstance(node.func, ast.Name) else name
            if name is not None:
                calls.setdefault(name, []).append(node)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            params = [a.arg for a in node.args.args if a.arg != "self"]
            for i, param in enumerate(params):
                sites = calls.get(node.name, [])
                if sites and all(
                    len(c.args) > i
                    and isinstance(c.args[i], ast.Constant)
                    and isinstance(c.args[i].value, str)
                    for c in sites
                ):
                    out.add((node.name, param))
    return out


def _unsafe_parts(node: ast.expr, constants: set[str], literal_params: set[str]) -> list[str]:
    """What an SQL expression interpolates besides module constants and parameters that only
    ever receive literals."""
    if not isinstance(node, ast.JoinedStr):
        return [ast.unparse(node)]
    return [
        ast.unparse(v.value)
        for v in node.values
        if isinstance(v, ast.FormattedValue)
        and not (isinstance(v.value, ast.Name) and v.value.id in constants | literal_params)
    ]


def test_sql_only_with_parameters() -> None:
    found = []
    for path, tree in sources():
        constants = _constants(tree)
        literal_only = {param for _, param in _literal_only_parameters(tree)}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in SQL_METHODS
                and node.args
                and _built(node.args[0])
            ):
                unsafe = _unsafe_parts(node.args[0], constants, literal_only)
                if unsafe:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {unsafe}")
    assert found == []


def test_the_checks_catch_what_they_look_for() -> None:
    """The detectors themselves: a query built from an f-string and a pickle import are found."""
    bad = ast.parse('import pickle\nconn.execute(f"SELECT {x}")\nconn.fetch("a" + b)')
    calls = [n for n in ast.walk(bad) if isinstance(n, ast.Call)]
    assert all(_built(c.args[0]) for c in calls)
    assert not _built(ast.parse('conn.execute("SELECT $1", x)').body[0].value.args[0])  # type: ignore[attr-defined]
    tree = ast.parse(
        'COLS = "a, b"\n'
        "def q(where): return conn.fetch(f'SELECT {COLS} FROM t {where}')\n"
        "q('WHERE a = $1')\n"
        "q(user_text)\n"
    )
    fetch = next(
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args and _built(n.args[0])
    )
    literal_only = {p for _, p in _literal_only_parameters(tree)}
    assert _unsafe_parts(fetch.args[0], _constants(tree), literal_only) == ["where"]
