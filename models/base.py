"""Declarative base, naming convention and column types shared by every table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, MetaData, String, text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so Alembic migrations can drop or alter them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Clever ids are 24 hex characters; platform ids are ours. 64 leaves room for both.
ID_LENGTH = 64


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads it once, at class creation)
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        list[str]: JSON(),
        str: String(),
    }


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


def journal_fk() -> Any:
    """The soft-removal marker of a district-owned row: the journal entry that removed it.

    NULL means the row is live. Every read of district-owned data filters on it, so a removal is
    hidden the moment it commits, and restore is one UPDATE per table back to NULL. Indexed by
    ``removed_index`` only where it is set: live rows are the many, removed ones the few.

    It holds a ``conversion_journal.id`` but is not declared a foreign key: Postgres would run a
    referential check for every row a removal marks, which made marking a district's 500,000
    enrollments six times slower. Journal entries are never deleted (purge keeps them as the
    record), so the reference cannot dangle.
    """
    return mapped_column(Integer, default=None)


def removed_index(table: str) -> Index:
    condition = text("removed_by IS NOT NULL")
    return Index(
        f"ix_{table}_removed_by", "removed_by", postgresql_where=condition, sqlite_where=condition
    )
