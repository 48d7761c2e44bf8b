"""Test databases: one real Postgres database per test run (per xdist worker) and one SQLite file,
both built by the Alembic migrations; every test isolated by a rolled-back outer transaction."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.support.app_env import broker, configure  # noqa: F401  (fixtures for the app's tests)
from tests.support.databases import PgDatabases, fresh_sqlite
from worker.db import make_engine
from worker.migrate import upgrade

# A failing test prints the tail of each process log it started; the ops API's tests and the
# poller's share their fixtures across their modules.
pytest_plugins = ["tests.support.process_logs", "tests.support.ops_api", "tests.support.poller"]


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    dbs = PgDatabases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["postgresql", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def pg_engine(pg_databases: PgDatabases) -> Iterator[Engine]:
    engine = make_engine(pg_databases.new())
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_engine(
    sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    engine = make_engine(fresh_sqlite(sqlite_template, tmp_path_factory.mktemp("sqlite-run")))
    yield engine
    engine.dispose()


@pytest.fixture
def engine(backend: str, request: pytest.FixtureRequest) -> Engine:
    engine: Engine = request.getfixturevalue(
        "pg_engine" if backend == "postgresql" else "sqlite_engine"
    )
    return engine


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back after the test."""
    with engine.connect() as conn:
        outer = conn.begin()
        sess = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
        try:
            yield sess
        finally:
            sess.close()
            outer.rollback()


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, migrated, committed-to database for tests that run the CLI or workers."""
    if backend == "postgresql":
        dbs: PgDatabases = request.getfixturevalue("pg_databases")
        return dbs.new()
    return fresh_sqlite(request.getfixturevalue("sqlite_template"), tmp_path)
