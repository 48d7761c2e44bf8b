"""The shared SQL helpers, on both backends, and the engine's connection handling."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Connection, Engine, Integer, String, func, literal, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from models import District, JournalEntry
from tasks.attempts import BUMP_UNIT
from tasks.sql import (
    COPY_INSERT_MIN_ROWS,
    ID_SEPARATOR,
    ROW_HASH_BITS,
    AsyncCommit,
    RowHash,
    execute_dml,
    in_ids,
    insert_rows,
)
from worker import db
from worker.db import make_engine
from worker.settings import get_settings


def _districts(session: Session, ids: list[str], *, skewed: bool = False) -> list[str]:
    return list(
        session.scalars(
            select(District.id).where(in_ids(District.id, ids, skewed=skewed)).order_by(District.id)
        )
    )


def test_in_ids_compiles_once_and_binds_each_call_own_ids(session: Session) -> None:
    session.add_all(District(id=f"d{n}", name=f"District {n}") for n in range(5))
    session.flush()
    cache = session.get_bind().engine._compiled_cache
    assert cache is not None

    before = len(cache)
    assert _districts(session, ["d1", "d3"]) == ["d1", "d3"]
    cached = len(cache)
    assert cached == before + 1
    # The same statement shape with other ids, and with more or fewer of them, is served from
    # the cache and still returns exactly the rows asked for.
    assert _districts(session, ["d0", "d2", "d4"]) == ["d0", "d2", "d4"]
    assert _districts(session, ["d4"]) == ["d4"]
    assert _districts(session, []) == []
    assert _districts(session, ["d9"]) == []
    assert len(cache) == cached


def test_row_hash_tells_rows_apart(session: Session) -> None:
    """Shifting text between fields, NULL for an empty string, a comma or a quote inside a
    value: each gives another row, and so another hash."""
    rows = [
        ("t", "ab", "c"),
        ("t", "a", "bc"),
        ("t", "", "abc"),
        ("t", None, "abc"),
        ("t", "a,b", "c"),
        ("t", "a", "b,c"),
        ("t", 'a"', "bc"),
        ("u", "ab", "c"),
        ("t", "ab", "c", None),
    ]

    def row_hash(row: tuple[str | None, ...]) -> int | None:
        # Typed values, as table columns are (a NULL of no type has no hash function).
        return session.scalar(select(RowHash(row[0], *(literal(v, String) for v in row[1:]))))

    hashes = [row_hash(row) for row in rows]
    assert all(isinstance(h, int) and 0 <= h < 2**ROW_HASH_BITS for h in hashes)
    assert len(set(hashes)) == len(rows)
    assert row_hash(rows[0]) == hashes[0]  # and the same row, the same hash


def test_row_hash_tells_numbers_apart_by_position(session: Session) -> None:
    def row_hash(*numbers: int) -> int | None:
        return session.scalar(select(RowHash("n", *(literal(n, Integer) for n in numbers))))

    hashes = {row_hash(1, 2), row_hash(2, 1), row_hash(1, 3), row_hash(0, 3), row_hash(3)}
    assert len(hashes) == 5


def test_async_commit_skips_the_wal_wait_of_its_own_transaction_only(pg_engine: Engine) -> None:
    def setting(conn: Connection) -> str | None:
        value: str | None = conn.scalar(text("SELECT current_setting('synchronous_commit')"))
        return value

    with pg_engine.connect() as conn:
        conn.execute(select(AsyncCommit()))
        assert setting(conn) == "off"
        conn.commit()
        assert setting(conn) == "on"
    with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # A statement is its own transaction here: the setting ends with it.
        conn.execute(select(AsyncCommit()))
        assert setting(conn) == "on"


def test_statements_with_async_commit_compile_once() -> None:
    # Without a cache key SQLAlchemy compiles the statement again on every execution.
    assert AsyncCommit()._generate_cache_key() is not None
    assert BUMP_UNIT._generate_cache_key() is not None
    assert str(select(AsyncCommit()).compile(dialect=sqlite.dialect())) == "SELECT NULL AS anon_1"


def test_postgres_connections_carry_the_lock_timeout_and_planner_costs(
    pg_engine: Engine,
) -> None:
    def show(engine: Engine, name: str) -> str | None:
        with engine.connect() as conn:
            return conn.execute(
                text("SELECT setting FROM pg_settings WHERE name = :name"), {"name": name}
            ).scalar()

    assert show(pg_engine, "lock_timeout") == str(get_settings().lock_timeout_ms)
    assert show(pg_engine, "random_page_cost") == "1.1"
    # Options in DATABASE_URL come after ours, so they win; ours still apply to the rest.
    own = make_engine(
        pg_engine.url.set(query={"options": "-c random_page_cost=3"}).render_as_string(False)
    )
    try:
        assert show(own, "random_page_cost") == "3"
        assert show(own, "lock_timeout") == str(get_settings().lock_timeout_ms)
    finally:
        own.dispose()


def test_a_connection_killed_while_idle_in_the_pool_is_replaced(
    pg_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(pg_engine.url.render_as_string(False))
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with pg_engine.connect() as admin:
            assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.0)  # it has been idle long enough
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    finally:
        engine.dispose()


@pytest.mark.parametrize("skewed", [False, True], ids=["any", "semi-join"])
def test_in_ids_matches_ids_holding_the_separator_or_other_types(
    session: Session, skewed: bool
) -> None:
    """Text ids go to Postgres as one separated string; an id holding the separator, or ids
    that are not text, take the array path and match all the same; as ``= ANY(...)``, or as a
    semi-join on the ids (``skewed``)."""
    odd = f"d{ID_SEPARATOR}x"
    session.add_all(District(id=i, name=i) for i in ("d1", "d2", odd, "d,3"))
    session.flush()
    assert _districts(session, ["d1", "d,3", "d1"], skewed=skewed) == ["d,3", "d1"]
    assert _districts(session, [odd, "d2"], skewed=skewed) == sorted([odd, "d2"])
    assert _districts(session, ["d"], skewed=skewed) == []
    assert _districts(session, [], skewed=skewed) == []
    in_order = select(func.count()).where(in_ids(literal(7), [5, 7, 9], skewed=skewed))
    assert session.scalar(in_order) == 1
    in_order = select(func.count()).where(in_ids(literal(7), [5, 9], skewed=skewed))
    assert session.scalar(in_order) == 0


def test_in_ids_as_a_semi_join_has_a_cache_key_of_its_own() -> None:
    # The two forms compile to different SQL: one must not be served the other's statement,
    # and each is compiled once whatever ids it is given.
    def key(ids: list[str], skewed: bool) -> Any:
        return (
            select(District.id).where(in_ids(District.id, ids, skewed=skewed))._generate_cache_key()
        )

    assert key(["d1"], False) != key(["d1"], True)
    assert key(["d1"], True) == key(["d2", "d3"], True)
    assert key(["d1"], False) == key(["d2", "d3"], False)


@pytest.mark.parametrize("count", [3, COPY_INSERT_MIN_ROWS + 5])
def test_insert_rows_stores_every_row_as_given_with_defaults_filled(
    session: Session, count: int
) -> None:
    """Few rows go by INSERT; many go to Postgres by COPY. Either way JSON arrives as JSON,
    None as NULL, and a column left out takes its default."""
    session.add(District(id="d1", name="District 1"))
    session.flush()
    rows = [
        {
            "kind": "account",
            "batch": "b1",
            "account_id": f"a{n:04d}",
            "district_id": "d1" if n % 2 else None,
            "rule": "test",
            "trigger": "test",
            "before": {"roles": ["student"], "n": n, "note": 'a "quoted",\ttabbed\nline'},
        }
        for n in range(count)
    ]
    insert_rows(session, JournalEntry, rows)
    stored = session.execute(
        select(
            JournalEntry.account_id,
            JournalEntry.district_id,
            JournalEntry.before,
            JournalEntry.created_at,
            JournalEntry.restored_at,
        )
        .where(JournalEntry.batch == "b1")
        .order_by(JournalEntry.account_id)
    ).all()
    assert [(r.account_id, r.district_id, r.before) for r in stored] == [
        (row["account_id"], row["district_id"], row["before"]) for row in rows
    ]
    assert all(r.created_at is not None and r.restored_at is None for r in stored)


def test_execute_dml_sees_what_the_session_holds_as_session_execute_would(
    session: Session,
) -> None:
    """Run on the session's connection, a statement still finds the rows the session has not
    written yet: they are flushed first, in the same transaction."""
    session.add(District(id="d-pending", name="Pending"))
    changed = execute_dml(
        session,
        update(District).where(District.id == "d-pending").values(name="Renamed"),
    )
    assert changed.rowcount == 1
    session.expire_all()
    assert session.scalar(select(District.name).where(District.id == "d-pending")) == "Renamed"
