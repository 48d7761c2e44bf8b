"""Engine and session scope. Every unit of work runs in one ``session_scope``."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from worker.settings import ConfigError, Settings, get_settings, normalize_database_url


class NoStack(ConfigError):
    """DATABASE_URL is not set and the home holds no database: there is no stack here."""


def require_stack(settings: Settings | None = None) -> None:
    """When DATABASE_URL is not set, refuse (NoStack), creating nothing, unless `grassroots run`
    or `grassroots db upgrade` made the home's database: connecting would make an empty file
    (and the home) and fail later with "no such table". An empty file left by an earlier version
    counts as no database."""
    settings = settings or get_settings()
    path = settings.home_database
    if path is None:
        return
    try:
        # Read-only: SQLite will not create a missing file.
        with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as conn:
            made = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
            ).fetchone()
    except sqlite3.Error:
        made = None
    if not made:
        raise NoStack(
            f"no grassroots stack in {settings.home.absolute()} (no database there): start one"
            " with `grassroots run`, pass --home, or set DATABASE_URL"
        )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the receiver read while a worker writes; busy_timeout makes a writer wait for the
    # lock instead of failing at once; SQLite ignores foreign keys unless told.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def postgres_options(own: str | None = None) -> str:
    """Session settings for every Postgres connection, as libpq ``options``.

    - ``lock_timeout``: a statement waiting on a row lock gives up after LOCK_TIMEOUT_MS and its
      task is retried, on every transaction without a ``SET`` round trip each.
    - ``statement_timeout``: one hung query does not hold a worker for good
      (STATEMENT_TIMEOUT_MS); cancelled, it fails its task like a lock timeout, and is retried.
    - ``random_page_cost``: the default (4) prices an index probe for a spinning disk, so looking
      up a batch of 1,000 ids "costs" more than reading the whole table (the learner checksum of
      an exit batch then scans every account and progress row: bench/README.md).
      1.1 is what the Postgres documentation suggests for SSDs and data that fits in memory.

    ``options`` given in DATABASE_URL come last, so they win.
    """
    settings = get_settings()
    ours = (
        f"-c lock_timeout={settings.lock_timeout_ms}"
        f" -c statement_timeout={settings.statement_timeout_ms} -c random_page_cost=1.1"
    )
    return f"{ours} {own}" if own else ours


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    if not url:
        settings = get_settings()
        require_stack(settings)
        url = settings.database_url
    url = normalize_database_url(url)
    parsed = make_url(url)
    # A refused row's values stay out of error messages, and so out of logs, dead letters and
    # the ops API: they can be personal data.
    kwargs.setdefault("hide_parameters", True)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    own = parsed.query.get("options")
    kwargs.setdefault("connect_args", {}).setdefault(
        "options", postgres_options(own if isinstance(own, str) else None)
    )
    engine = create_engine(url, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        _ping_when_idle(engine)
    return engine


# A pooled connection that sat unused this long is pinged before it is handed out.
IDLE_PING_SECONDS = 5.0


def _ping_when_idle(engine: Engine) -> None:
    """Pessimistic disconnect handling, without a round trip on every checkout.

    ``pool_pre_ping`` pings each time a connection leaves the pool: an exit unit checks one out
    twice, and under load the pings took a large share of a worker's time. A connection in
    steady use is known to be alive; only one that idled (a database restart, say) is pinged, and
    if the ping fails the pool replaces it. A connection lost mid-use still fails its task, which
    the task's retries take care of.
    """

    @event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError("the pooled connection is gone") from exc


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    return make_engine()


@lru_cache(maxsize=1)
def _sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(bind: Engine | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    factory = _sessionmaker() if bind is None else sessionmaker(bind=bind, expire_on_commit=False)
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def autocommit() -> Iterator[Connection]:
    """A connection whose every statement commits on its own: one round trip for a one-statement
    write, where a session scope costs three (BEGIN, the statement, COMMIT)."""
    with get_engine().connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")
