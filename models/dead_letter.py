from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow


class DeadLetter(Base):
    """A task that failed for good, kept with everything needed to replay it."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    event_id: Mapped[str | None] = mapped_column(
        ForeignKey("roster_events.id", ondelete="SET NULL"), index=True
    )
    task: Mapped[str] = mapped_column(String(200))
    # What failed, for a task that is not about an event: ``exit_unit:<exit>:<key>``, or the
    # task and its Celery id. An operator's resume or replay closes its dead letters by it.
    subject: Mapped[str | None] = mapped_column(String(300), index=True)
    args: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reason: Mapped[str] = mapped_column(String(64))
    # The exception's class; ``error`` its message (never the values of a statement's parameters).
    exception: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    # The worker that gave up on it (the last failure's).
    host: Mapped[str | None] = mapped_column(String(200))
    first_failed_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_failed_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(index=True)
