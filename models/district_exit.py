from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, utcnow
from models.enums import ExitStatus, UnitKind, UnitStatus, sql_in


class DistrictExit(Base):
    """A district exit in progress or done: the fan-out's bookkeeping, keyed by its journal root."""

    __tablename__ = "district_exits"
    __table_args__ = (
        CheckConstraint(sql_in("status", ExitStatus), name="status"),
        CheckConstraint("units_done <= units_total", name="done_le_total"),
    )

    id: Mapped[int] = mapped_column(
        ForeignKey("conversion_journal.id", ondelete="RESTRICT"), primary_key=True
    )
    district_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    trigger: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=ExitStatus.RUNNING, index=True)
    units_total: Mapped[int] = mapped_column(default=0)
    # The first phase: once this many units are done, the account batches start.
    teacher_units: Mapped[int] = mapped_column(default=0, server_default="0")
    units_done: Mapped[int] = mapped_column(default=0)
    accounts_total: Mapped[int] = mapped_column(default=0)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When a unit last finished: an exit that stops progressing has lost a unit to a crash.
    progressed_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


OPEN_UNITS = sql_in("status", (UnitStatus.PENDING, UnitStatus.DEAD))


class ExitUnit(Base):
    """One fanned-out piece of an exit: a teacher's classes, or a batch of accounts.

    The key is deterministic, so a parent redelivered after a crash adds only what is missing.
    """

    __tablename__ = "exit_units"
    __table_args__ = (
        CheckConstraint(sql_in("status", UnitStatus), name="status"),
        CheckConstraint(sql_in("kind", UnitKind), name="kind"),
        # The open units (pending or dead), by key: counting them follows the backlog, not the
        # exits' history. Keyed like the primary key, so a unit's own lookup is one probe whichever
        # index the planner takes; an index on status alone was taken for it when the statistics
        # predated the exit, and scanned every pending unit for each unit that ran.
        Index(
            "ix_exit_units_open",
            "exit_id",
            "key",
            postgresql_where=text(OPEN_UNITS),
            sqlite_where=text(OPEN_UNITS),
        ),
    )

    exit_id: Mapped[int] = mapped_column(
        ForeignKey("district_exits.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    # Compressed with lz4 on Postgres (migration 0012): an exit's start writes them all at once.
    account_ids: Mapped[list[str]] = mapped_column(default=list)
    status: Mapped[str] = mapped_column(String(16), default=UnitStatus.PENDING)
    attempts: Mapped[int] = mapped_column(default=0)
    dispatched_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
