from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow


class TaskAttempt(Base):
    """The attempts of one task message that has no row of its own to count them on (an exit's
    start and finish, a sync, the periodic tasks), by its Celery task id: a message keeps its id
    across retries and redeliveries, so a task that kills its worker every time is still capped.
    Rows older than the retention window are purged."""

    __tablename__ = "task_attempts"
    __table_args__ = (CheckConstraint("attempts >= 0", name="attempts_non_negative"),)

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task: Mapped[str] = mapped_column(String(100))
    attempts: Mapped[int] = mapped_column(default=0)
    first_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    last_at: Mapped[datetime] = mapped_column(default=utcnow)
