"""Run Alembic migrations programmatically: the only way the schema is made."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection

import models
from worker.db import make_engine
from worker.settings import get_settings

MIGRATIONS = Path(models.__file__).parent / "migrations"


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at ``url`` (default: the settings'), creating a SQLite file if
    there is none."""
    _run(command.upgrade, url, revision)


def downgrade(url: str | None = None, revision: str = "base") -> None:
    _run(command.downgrade, url, revision)


def _run(step: Callable[[Config, str], None], url: str | None, revision: str) -> None:
    # On the application's own engine, so its connection settings apply.
    engine = make_engine(url or get_settings().database_url)
    try:
        with engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # SQLite changes a table's constraints only by copying it (Alembic's batch mode),
                # and dropping the old copy would delete, or refuse to delete, the rows that
                # reference it. Foreign keys are off while migrating (SQLite's own procedure for
                # altering a table), set outside the transaction as SQLite requires, and checked
                # before the commit.
                conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                conn.commit()
            with conn.begin():
                step(alembic_config(connection=conn), revision)
                if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise RuntimeError("the migration left rows that reference nothing")
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
    finally:
        engine.dispose()
