from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, utcnow
from models.enums import RequestKind, RequestStatus, sql_in


class OperatorRequest(Base):
    """An operator's (or the schedule's) request to start an exit or a sync, written before its
    message is sent (SPEC §6). The task that gets the message acts only on what this row asks
    for; the relay sends again a request no worker has taken."""

    __tablename__ = "operator_requests"
    __table_args__ = (
        CheckConstraint(sql_in("kind", RequestKind), name="kind"),
        CheckConstraint(sql_in("status", RequestStatus), name="status"),
        CheckConstraint("attempts >= 0", name="attempts_non_negative"),
        # The relay's question: what is still only asked, oldest send first.
        Index("ix_operator_requests_asked", "status", "sent_at"),
    )

    # A sync's request shares its id with the sync's record (``roster_syncs``).
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    district_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    by: Mapped[str] = mapped_column(String(200))  # the trigger the work is audited under
    dry_run: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16), default=RequestStatus.ASKED)
    # The task id of its last message: one a worker holds unacknowledged is not sent again.
    task_id: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When a worker last counted an attempt at it.
    taken_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
