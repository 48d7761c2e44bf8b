"""Small SQL helpers shared by the units of work."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import sql as pgsql
from sqlalchemy import (
    JSON,
    BigInteger,
    CursorResult,
    Engine,
    Executable,
    String,
    any_,
    bindparam,
    event,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.sqltypes import NullType
from sqlalchemy.sql.visitors import InternalTraversal

from tasks.errors import GrassrootsError

T = TypeVar("T")

# Keeps every IN (...) list well under SQLite's and Postgres' bound-parameter limits.
CHUNK = 1000


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def existing_ids(session: Session, column: Any, ids: Iterable[Any], *where: Any) -> set[Any]:
    """The ids found in ``column`` (of rows that also meet ``where``)."""
    found: set[Any] = set()
    for batch in chunks(sorted(set(ids))):
        found.update(session.scalars(select(column).where(column.in_(batch), *where)))
    return found


# Joins a list of text ids into one parameter for Postgres to split; no id may contain it.
ID_SEPARATOR = "\x1f"  # ASCII unit separator


class InIds(ColumnElement[bool]):
    """``column IN (ids)``, sent to Postgres as ``column = ANY(...)``: one parameter instead of a
    thousand, which spares the driver and the server parsing a statement a page long for every
    batch.

    Text ids travel as one string that Postgres splits (``string_to_array``): the driver quotes an
    array parameter element by element in Python, a client cost paid on every batch of a district
    exit. Other ids, or text ids holding the separator, travel as an array.

    ``skewed``: Postgres keeps most-common values for the column (a teacher id in the class
    links, say), and estimating ``= ANY(...)`` compares each of the thousand ids with that list
    whenever the statement is planned for its ids, which makes planning slow. The ids then go in
    as a semi-join on their ``unnest``, which the planner estimates without that.

    Cacheable: the ids travel in bound parameters that are part of the statement's cache key, so
    a statement of the same shape compiles once per process, whatever ids it is given. Each
    dialect renders the parameter it uses; the others are ignored when the cached statement takes
    its values.
    """

    # Untyped, so SQLite (no native booleans) does not append "= 1" and lose its index.
    type = NullType()  # type: ignore[assignment]
    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012 (SQLAlchemy's own)
        ("column", InternalTraversal.dp_clauseelement),
        ("joined", InternalTraversal.dp_clauseelement),
        ("array", InternalTraversal.dp_clauseelement),
        ("listed", InternalTraversal.dp_clauseelement),
        ("as_text", InternalTraversal.dp_boolean),
        ("skewed", InternalTraversal.dp_boolean),
    ]

    def __init__(self, column: Any, ids: Sequence[Any], *, skewed: bool = False) -> None:
        values = list(ids)
        joined = _joined(values)
        self.column = column
        self.skewed = skewed
        self.as_text = joined is not None
        self.joined = bindparam(None, joined, type_=String())
        self.array = bindparam(None, None if self.as_text else values, type_=ARRAY(column.type))
        self.listed = bindparam(None, values, type_=column.type, expanding=True)

    @classmethod
    def named(cls, column: Any, name: str, *, as_text: bool, skewed: bool = False) -> InIds:
        """Ids given when the statement runs, as ``ids_params(name, ids)``: a statement built
        once then serves every call (building and keying a large statement costs more than
        running it for one account)."""
        self = cls.__new__(cls)
        self.column = column
        self.skewed = skewed
        self.as_text = as_text
        self.joined = bindparam(f"{name}_joined", type_=String())
        self.array = bindparam(f"{name}_array", type_=ARRAY(column.type))
        self.listed = bindparam(f"{name}_listed", type_=column.type, expanding=True)
        return self


def ids_params(name: str, ids: Sequence[Any]) -> tuple[bool, dict[str, Any]]:
    """The parameters of ``InIds.named(…, name, as_text=…)`` for ``ids``, and which ``as_text``
    the statement must have been built with."""
    values = list(ids)
    joined = _joined(values)
    as_text = joined is not None
    return as_text, {
        f"{name}_joined": joined,
        f"{name}_array": None if as_text else values,
        f"{name}_listed": values,
    }


def _joined(values: list[Any]) -> str | None:
    """The ids as one separated string, if they are all text and none holds the separator."""
    if not values:
        return ""  # which Postgres splits into an empty array
    if not all(isinstance(v, str) for v in values):
        return None
    joined = ID_SEPARATOR.join(values)
    return joined if joined.count(ID_SEPARATOR) == len(values) - 1 else None


@compiles(InIds)
def _in_list(element: InIds, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column.in_(element.listed), **kw))


@compiles(InIds, "postgresql")
def _any_array(element: InIds, compiler: Any, **kw: Any) -> str:
    ids = (
        func.string_to_array(element.joined, literal_column("E'\\x1f'"))
        if element.as_text
        else element.array
    )
    if element.skewed:
        return str(compiler.process(element.column.in_(select(func.unnest(ids))), **kw))
    return str(compiler.process(element.column == any_(ids), **kw))


def in_ids(column: Any, ids: Sequence[Any], *, skewed: bool = False) -> ColumnElement[bool]:
    return InIds(column, ids, skewed=skewed)


def execute_dml(
    session: Session, statement: Executable, params: dict[str, Any] | None = None
) -> CursorResult[Any]:
    """An INSERT, UPDATE or DELETE that changes no object the session holds, run on the
    session's connection in its transaction: the ORM's handling of such a statement costs a
    quarter of a millisecond, and every event's conversion runs several. What the session holds
    is flushed first, as ``session.execute`` would."""
    session.flush()
    return session.connection().execute(statement, params)


def count(session: Session, model: Any, *where: ColumnElement[bool]) -> int:
    """How many rows of ``model`` meet ``where``."""
    return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def dialect_insert(session: Session, model: Any) -> Any:
    """The backend's own INSERT, which has ``on_conflict_do_nothing`` / ``_do_update``."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise GrassrootsError(f"unsupported database {dialect}")


class RowHash(ColumnElement[int]):
    """A 40-bit hash of a row of values, as an integer, for digests summed in SQL: a sum of row
    hashes digests a set of rows without ordering them, and 40 bits leave room to add up millions
    of rows in a BIGINT.

    Postgres hashes the row itself with ``hash_record_extended`` (Postgres 14+): each value by its
    type's own hash function (a NULL counts as 0, an empty string does not), mixed by position.
    Every value must have a hash function (text, numbers, times; not ``json``). It is far cheaper
    than an MD5 of the row's text, and the digest only has to catch a conversion that changed
    learner data by mistake. SQLite calls the function registered below on a JSON array of the
    values. The two give different numbers; a digest is only ever compared with one taken by the
    same database, in the same transaction.
    """

    type = BigInteger()
    inherit_cache = True
    _traverse_internals = [("values", InternalTraversal.dp_clauseelement_tuple)]  # noqa: RUF012

    def __init__(self, *values: Any) -> None:
        self.values = tuple(literal(v, String) if isinstance(v, str) else v for v in values)


class JsonList(ColumnElement[Any]):
    """An aggregate: the group's values of ``column`` as a JSON array, in ascending order.
    Postgres: ``json_agg(column ORDER BY column)``; SQLite (no ordered aggregates before 3.44):
    ``json_group_array(column)``, in the order the rows come, which the query sets."""

    type = JSON()
    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column


@compiles(JsonList)
def _json_group_array(element: JsonList, compiler: Any, **kw: Any) -> str:
    return f"json_group_array({compiler.process(element.column, **kw)})"


@compiles(JsonList, "postgresql")
def _json_agg(element: JsonList, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    return f"json_agg({column} ORDER BY {column})"


class ZeroPadded(ColumnElement[str]):
    """A non-negative integer as text, padded with zeros to ``width`` digits."""

    type = String()
    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012
        ("number", InternalTraversal.dp_clauseelement),
        ("width", InternalTraversal.dp_plain_obj),
    ]

    def __init__(self, number: ColumnElement[int], width: int) -> None:
        self.number = number
        self.width = width


@compiles(ZeroPadded)
def _printf_padded(element: ZeroPadded, compiler: Any, **kw: Any) -> str:
    return f"printf('%0{int(element.width)}d', {compiler.process(element.number, **kw)})"


@compiles(ZeroPadded, "postgresql")
def _lpad(element: ZeroPadded, compiler: Any, **kw: Any) -> str:
    number = compiler.process(element.number, **kw)
    return f"lpad(CAST({number} AS TEXT), {int(element.width)}, '0')"


class AsyncCommit(ColumnElement[Any]):
    """A column whose side effect is that its transaction commits without waiting for the WAL
    flush: ``set_config('synchronous_commit', 'off', true)`` on Postgres, NULL elsewhere.

    For writes whose loss in a crash of Postgres itself is harmless, because what stays behind
    says they are still to do: an attempt counter (a lost increment allows one more attempt) and
    an exit unit (it commits with its ``done`` mark, so a lost unit is simply pending again). As a
    column of the transaction's first statement it spares a ``SET LOCAL`` round trip, and it works
    in autocommit too, where a statement is its own transaction and ``SET LOCAL`` does nothing.
    """

    type = NullType()
    inherit_cache = True
    _traverse_internals = []  # noqa: RUF012  # no state: one cache key for every instance


@compiles(AsyncCommit)
def _no_async_commit(element: AsyncCommit, compiler: Any, **kw: Any) -> str:
    return "NULL"


# What AsyncCommit is on Postgres, for statements written as text.
ASYNC_COMMIT_PG = "set_config('synchronous_commit', 'off', true)"


@compiles(AsyncCommit, "postgresql")
def _async_commit(element: AsyncCommit, compiler: Any, **kw: Any) -> str:
    return ASYNC_COMMIT_PG


SQLITE_ROW_HASH = "grassroots_row_hash"


ROW_HASH_BITS = 40


def _hash_of_text(text: str) -> int:
    return int(
        hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()[: ROW_HASH_BITS // 4], 16
    )


@compiles(RowHash)
def _hash_function(element: RowHash, compiler: Any, **kw: Any) -> str:
    values = ", ".join(compiler.process(v, **kw) for v in element.values)
    return f"{SQLITE_ROW_HASH}({values})"


@compiles(RowHash, "postgresql")
def _hash_record(element: RowHash, compiler: Any, **kw: Any) -> str:
    values = ", ".join(compiler.process(v, **kw) for v in element.values)
    return f"(hash_record_extended(ROW({values}), 0) & {2**ROW_HASH_BITS - 1})"


@event.listens_for(Engine, "connect")
def _register_sqlite_functions(dbapi_connection: Any, _record: Any) -> None:
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.create_function(
            SQLITE_ROW_HASH, -1, _row_hash_of_values, deterministic=True
        )


def _row_hash_of_values(*values: Any) -> int:
    return _hash_of_text(json.dumps(values))


# From this many rows on, a plain INSERT goes to Postgres by COPY, which streams the rows where
# psycopg's executemany sends one INSERT per row. One account's conversion journals a handful of
# rows (an executemany); an exit's batch of accounts, one or more per account (a COPY).
COPY_INSERT_MIN_ROWS = 100


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
    if len(rows) < COPY_INSERT_MIN_ROWS or session.get_bind().dialect.name != "postgresql":
        session.connection().execute(insert(table), list(rows))
        return
    fills = {key: _default_value(default) for key, default in defaults.items()}
    columns = [*names, *fills]
    dialect = session.get_bind().dialect
    # Each value as SQLAlchemy would bind it (JSON serialised, type decorators applied).
    processors = [table.c[name].type._cached_bind_processor(dialect) for name in columns]
    filled = list(fills.values())
    copy_rows(
        session,
        table.name,
        columns,
        (
            [
                v if proc is None else proc(v)
                for v, proc in zip([row[name] for name in names] + filled, processors, strict=True)
            ]
            for row in rows
        ),
    )


def copy_rows(
    session: Session, table_name: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Postgres: stream ``rows`` (each its values in ``columns`` order, as the driver takes them)
    into ``table_name`` by COPY, on the session's own connection: part of its transaction."""
    dbapi = session.connection().connection.driver_connection
    if not isinstance(dbapi, psycopg.Connection):
        raise GrassrootsError("COPY needs the psycopg driver")
    statement = pgsql.SQL("COPY {} ({}) FROM STDIN").format(
        pgsql.Identifier(table_name), pgsql.SQL(", ").join(map(pgsql.Identifier, columns))
    )
    with dbapi.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def _default_value(default: Any) -> Any:
    """The value of a column's Python-side default, taken once for a whole COPY (a callable such
    as ``utcnow`` gives every row of the statement the same time, as a server default would)."""
    if default.is_callable:
        return default.arg(None)
    if default.is_scalar:
        return default.arg
    raise GrassrootsError(f"cannot COPY a column whose default is {default!r}")


def refresh_statistics(session: Session) -> None:
    """After a bulk load, tell Postgres' planner what the tables now hold: with the statistics of
    empty tables it picks nested loops that make a query a hundred times slower."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("ANALYZE"))
