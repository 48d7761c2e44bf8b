"""Small SQL helpers shared by the units of work."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql as pgsql
from sqlalchemy import (
    BigInteger,
    Engine,
    String,
    any_,
    bindparam,
    cast,
    event,
    func,
    insert,
    literal,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.sqltypes import NullType
from sqlalchemy.sql.visitors import InternalTraversal

from tasks.errors import GrassrootsError


class InIds(ColumnElement[bool]):
    """``column IN (ids)``, sent to Postgres as ``column = ANY(:array)``: one parameter instead of
    a thousand, which spares the driver and the server parsing a statement a page long for every
    batch.

    Cacheable: the ids travel in bound parameters that are part of the statement's cache key, so
    a statement of the same shape compiles once per process, whatever ids it is given. Both
    parameters are built up front and each dialect renders the one it uses; the other is ignored
    when the cached statement takes its values.
    """

    # Untyped, so SQLite (no native booleans) does not append "= 1" and lose its index.
    type = NullType()  # type: ignore[assignment]
    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012 (SQLAlchemy's own)
        ("column", InternalTraversal.dp_clauseelement),
        ("array", InternalTraversal.dp_clauseelement),
        ("listed", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: Any, ids: Sequence[Any]) -> None:
        values = list(ids)
        self.column = column
        self.array = bindparam(None, values, type_=ARRAY(column.type))
        self.listed = bindparam(None, values, type_=column.type, expanding=True)


@compiles(InIds)
def _in_list(element: InIds, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column.in_(element.listed), **kw))


@compiles(InIds, "postgresql")
def _any_array(element: InIds, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column == any_(element.array), **kw))


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


class RowHash(ColumnElement[int]):
    """A 48-bit hash of a text value: the first 12 hex digits of its MD5, as an integer.

    The same number on both backends (Postgres computes it natively, SQLite through the function
    registered below), so digests can be summed in SQL: a sum of row hashes is a digest of a set
    of rows that needs no ordering, and 48 bits leave room to add up millions of rows in a BIGINT.
    """

    type = BigInteger()
    inherit_cache = True
    _traverse_internals = [("text", InternalTraversal.dp_clauseelement)]  # noqa: RUF012

    def __init__(self, text: ColumnElement[str]) -> None:
        self.text = text


SQLITE_HASH48 = "grassroots_hash48"


def hash48(text: str) -> int:
    return int(hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()[:12], 16)


@compiles(RowHash)
def _hash_function(element: RowHash, compiler: Any, **kw: Any) -> str:
    return f"{SQLITE_HASH48}({compiler.process(element.text, **kw)})"


@compiles(RowHash, "postgresql")
def _hash_md5(element: RowHash, compiler: Any, **kw: Any) -> str:
    text = compiler.process(element.text, **kw)
    return f"('x' || substr(md5({text}), 1, 12))::bit(48)::bigint"


@event.listens_for(Engine, "connect")
def _register_sqlite_functions(dbapi_connection: Any, _record: Any) -> None:
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.create_function(SQLITE_HASH48, 1, _hash48_or_null, deterministic=True)


def _hash48_or_null(text: str | None) -> int | None:
    return None if text is None else hash48(text)


def field_text(value: Any) -> ColumnElement[str]:
    """A column as unambiguous text for hashing: its length, a colon and the value; ``-`` for
    NULL. Concatenating several such fields can never make two different rows look alike."""
    as_text = cast(value, String)
    return func.coalesce(cast(func.length(as_text), String) + ":" + as_text, "-")


def record_text(tag: str | ColumnElement[str], *values: Any) -> ColumnElement[str]:
    """A row as one text: its tag (a table name, say) and its fields."""
    text: ColumnElement[str] = (literal(tag, String) if isinstance(tag, str) else tag) + "|"
    for value in values:
        text = text + field_text(value)
    return text


# From this many rows on, Postgres gets the rows by COPY instead of an executemany, which psycopg
# sends as one INSERT per row: 1,000 journal rows took 50 ms that way, and 4 ms by COPY.
COPY_MIN_ROWS = 100


def insert_rows(session: Session, model: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Plain INSERT of many rows of ``model``, each with the same keys, in the session's
    transaction. Column defaults the rows leave out are filled in as SQLAlchemy would."""
    if not rows:
        return
    table = model.__table__
    names = list(rows[0])
    defaults = {
        col.key: col.default
        for col in table.columns
        if col.key not in rows[0] and col.default is not None and not col.primary_key
    }
    session.flush()  # what the session holds goes first, as ``session.execute`` would
    if len(rows) < COPY_MIN_ROWS or session.get_bind().dialect.name != "postgresql":
        session.connection().execute(insert(table), list(rows))
        return
    fills = {key: _default_value(default) for key, default in defaults.items()}
    columns = [*names, *fills]
    dialect = session.get_bind().dialect
    # Each value as SQLAlchemy would bind it (JSON serialised, type decorators applied).
    processors = [table.c[name].type._cached_bind_processor(dialect) for name in columns]
    dbapi = session.connection().connection.driver_connection
    if not isinstance(dbapi, psycopg.Connection):
        raise GrassrootsError("COPY needs the psycopg driver")
    statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
        pgsql.Identifier(table.name), pgsql.SQL(", ").join(map(pgsql.Identifier, columns))
    )
    with dbapi.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            values = [row[name] for name in names] + list(fills.values())
            copy.write_row(
                [v if proc is None else proc(v) for v, proc in zip(values, processors, strict=True)]
            )


def _default_value(default: Any) -> Any:
    """The value of a column's Python-side default, taken once for a whole COPY (a callable such
    as ``utcnow`` gives every row of the statement the same time, as a server default would)."""
    if default.is_callable:
        return default.arg(None)
    if default.is_scalar:
        return default.arg
    raise GrassrootsError(f"cannot COPY a column whose default is {default!r}")
