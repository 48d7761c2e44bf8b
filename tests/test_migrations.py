"""The schema is made by the migrations alone, and they agree with the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from models import Base
from worker.db import make_engine
from worker.migrate import downgrade, upgrade


def test_migrations_build_exactly_the_tables_the_models_declare(engine: Engine) -> None:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
        tables = set(inspect(conn).get_table_names()) - {"alembic_version"}
    assert diff == []
    assert tables == set(Base.metadata.tables)


def test_migrations_run_down_to_nothing_and_back_up(database_url: str) -> None:
    downgrade(database_url)
    engine = make_engine(database_url)
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
    upgrade(database_url)
    with engine.connect() as conn:
        assert set(inspect(conn).get_table_names()) - {"alembic_version"} == set(
            Base.metadata.tables
        )
    engine.dispose()


def test_exit_units_keep_their_account_ids_lz4_compressed_on_postgres(pg_engine: Engine) -> None:
    """Where the server has lz4 (Debian's Postgres does): an exit's start writes every account id
    of the district into its units at once, and pglz spent a third of that statement."""
    with pg_engine.connect() as conn:
        has_lz4 = conn.scalar(
            text(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_settings"
                " WHERE name = 'default_toast_compression'"
            )
        )
        method = conn.scalar(
            text(
                "SELECT attcompression FROM pg_attribute"
                " WHERE attrelid = 'exit_units'::regclass AND attname = 'account_ids'"
            )
        )
    assert has_lz4
    assert method == "l"
