"""Throwaway databases for the tests: Postgres databases copied from one migrated template, and
SQLite files copied from a migrated one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg

from worker.migrate import upgrade

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_url(database: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


def _pg_admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.encode())


class PgDatabases:
    """Creates throwaway Postgres databases from one migrated template."""

    def __init__(self) -> None:
        self.prefix = f"grtest_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.template = f"{self.prefix}_tmpl"
        self.created: list[str] = []
        _pg_admin(f'CREATE DATABASE "{self.template}"')
        self.created.append(self.template)
        upgrade(_pg_url(self.template))

    def new(self) -> str:
        name = f"{self.prefix}_{len(self.created)}"
        _pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self.created.append(name)
        return _pg_url(name)

    def drop_all(self) -> None:
        for name in reversed(self.created):
            _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fresh_sqlite(template: Path, directory: Path) -> str:
    target = directory / f"{uuid.uuid4().hex}.db"
    target.write_bytes(template.read_bytes())
    return f"sqlite:///{target}"
