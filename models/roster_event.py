from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, utcnow
from models.enums import EventStatus, sql_in


class RosterEvent(Base):
    """The inbox: every Clever event received, by webhook or poll, exactly once by its id."""

    __tablename__ = "roster_events"
    __table_args__ = (
        CheckConstraint(sql_in("status", EventStatus), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        Index(None, "object_type", "object_id"),
        # What waits (accepted, processing, held, deferred, dead) is found, counted and paged in
        # order without reading the final events of the inbox's whole history: every read of a
        # status goes through this index (status, then a received_at range or order).
        Index(None, "status", "received_at"),
    )

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    type: Mapped[str] = mapped_column(String(100), index=True)
    source: Mapped[str] = mapped_column(String(16), default="webhook")
    district_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), index=True)
    object_type: Mapped[str | None] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    # Clever's own `created` time of the event: the ordering fence compares it.
    occurred_at: Mapped[datetime | None]
    payload: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default=EventStatus.ACCEPTED)
    attempts: Mapped[int] = mapped_column(default=0)
    # The Celery task whose attempt was counted last: the relay does not send the event again
    # while the broker holds that task for a worker.
    task_id: Mapped[str | None] = mapped_column(String(64))
    # Set when an operator releases a held removal: the brake is not applied to it again.
    brake_released: Mapped[bool] = mapped_column(default=False, server_default=false())
    # The pause that deferred it last (``tasks.pauses``): its end or removal releases it.
    pause_id: Mapped[int | None] = mapped_column(ForeignKey("pauses.id", ondelete="RESTRICT"))
    error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
