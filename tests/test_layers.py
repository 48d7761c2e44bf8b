"""The layers the import contracts cannot see: the runtime (``worker/``) opens sessions and calls
``tasks/``, and writes no SQL statement of its own (README, "Code map")."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the runtime may take from SQLAlchemy: sessions, engines and their errors, never a
# statement builder (select, insert, update, delete, text, func…).
ALLOWED = ("sqlalchemy.exc", "sqlalchemy.orm", "sqlalchemy.engine")
# Connection setup, the one exception: the engine and its connect-time hooks (``db.py``: its
# SQLite pragmas, the check that a stack's database exists) and the migrations' own pragmas.
CONNECTION_SETUP = {"worker/db.py": {"create_engine", "event"}, "worker/migrate.py": set()}
# How a statement reaches the database: none of these is called in the runtime.
RUNS_SQL = {"execute", "scalar", "scalars", "exec_driver_sql"}
DATABASE_HANDLES = {"session", "conn", "connection"}


def _runtime_modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted((ROOT / "worker").rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(), str(path))


def _sql_imports(name: str, tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "sqlalchemy"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
            module = node.module or ""
            if module.startswith(ALLOWED):
                continue
            allowed = CONNECTION_SETUP.get(name, set()) if module == "sqlalchemy" else set()
            found += [f"{module}.{a.name}" for a in node.names if a.name not in allowed]
    return found


def _sql_calls(tree: ast.Module) -> list[str]:
    return [
        f"{node.func.value.id}.{node.func.attr} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in RUNS_SQL
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in DATABASE_HANDLES
    ]


def test_the_runtime_imports_no_statement_builder() -> None:
    found = {
        name: imports for name, tree in _runtime_modules() if (imports := _sql_imports(name, tree))
    }
    assert found == {}, "SQL belongs in tasks/: move the statement there and call it"


def test_the_runtime_runs_no_statement_of_its_own() -> None:
    found = {
        name: calls
        for name, tree in _runtime_modules()
        if name not in CONNECTION_SETUP and (calls := _sql_calls(tree))
    }
    assert found == {}, "SQL belongs in tasks/: move the statement there and call it"


def test_the_checks_catch_a_statement_in_the_runtime() -> None:
    # The two checks above would pass on any tree if they could not see an offence.
    tree = ast.parse(
        "from sqlalchemy import select, text\n"
        "def f(session):\n"
        "    session.execute(text('SELECT 1'))\n"
    )
    assert _sql_imports("worker/x.py", tree) == ["sqlalchemy.select", "sqlalchemy.text"]
    assert _sql_imports("worker/db.py", tree) == ["sqlalchemy.select", "sqlalchemy.text"]
    assert _sql_calls(tree) == ["session.execute (line 3)"]
