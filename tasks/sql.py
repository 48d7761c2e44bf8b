"""Small SQL helpers shared by the units of work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import any_, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.sqltypes import NullType

from tasks.errors import GrassrootsError


class InIds(ColumnElement[bool]):
    """``column IN (ids)``, sent to Postgres as ``column = ANY(:array)``: one parameter instead of
    a thousand, which spares the driver and the server parsing a statement a page long for every
    batch."""

    # Untyped, so SQLite (no native booleans) does not append "= 1" and lose its index.
    type = NullType()  # type: ignore[assignment]
    inherit_cache = False

    def __init__(self, column: Any, ids: Sequence[Any]) -> None:
        self.column = column
        self.ids = list(ids)


@compiles(InIds)
def _in_list(element: InIds, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column.in_(element.ids), **kw))


@compiles(InIds, "postgresql")
def _any_array(element: InIds, compiler: Any, **kw: Any) -> str:
    array = bindparam(None, element.ids, type_=ARRAY(element.column.type))
    return str(compiler.process(element.column == any_(array), **kw))


def in_ids(column: Any, ids: Sequence[Any]) -> ColumnElement[bool]:
    return InIds(column, ids)


def dialect_insert(session: Session, model: Any) -> Any:
    """The backend's own INSERT, which has ``on_conflict_do_nothing`` / ``_do_update``."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise GrassrootsError(f"unsupported database {dialect}")
