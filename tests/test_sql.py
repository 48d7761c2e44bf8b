"""The shared SQL helpers, on both backends, and the engine's connection handling."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, String, literal, select, text
from sqlalchemy.orm import Session

from models import District
from tasks.sql import RowHash, hash48, in_ids, record_text
from worker import db
from worker.db import make_engine
from worker.settings import get_settings


def _districts(session: Session, ids: list[str]) -> list[str]:
    return list(
        session.scalars(select(District.id).where(in_ids(District.id, ids)).order_by(District.id))
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


def test_row_hash_is_the_same_number_on_every_backend(session: Session) -> None:
    text = "progress|5:fract1:7-"  # non-ASCII too: both sides hash the UTF-8 bytes
    for value in (text, text + "é", ""):
        assert session.scalar(select(RowHash(literal(value)))) == hash48(value)
    assert hash48(text) != hash48(text + "é")


def test_record_text_keeps_fields_apart(session: Session) -> None:
    """Fields are length-prefixed and NULL is marked, so shifting text between fields or
    replacing a value by NULL changes the record."""
    records = {
        session.scalar(select(record_text("t", literal(a, String), literal(b, String))))
        for a, b in (("ab", "c"), ("a", "bc"), ("", "abc"), (None, "abc"), ("-", "abc"))
    }
    assert len(records) == 5


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
