from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, TimestampMixin
from models.enums import PollStatus, sql_in


class PollCursor(TimestampMixin, Base):
    """Where the Clever Events API poller stands in one district's feed.

    ``cursor`` is the id of the last event whose page is committed to the inbox: the next pass
    asks for what comes after it. It moves in the same transaction as that page's inbox rows.
    NULL with ``started_at`` set means "from the start of the feed" (the feed was empty when the
    district was first polled, or an operator asked for a replay); ``started_at`` NULL means the
    district was never polled: its first pass only records where the feed ends.
    """

    __tablename__ = "clever_poll_cursors"
    __table_args__ = (
        CheckConstraint(sql_in("status", PollStatus), name="status"),
        CheckConstraint("unauthorized_passes >= 0", name="unauthorized_passes_non_negative"),
        CheckConstraint("events_ingested >= 0", name="events_ingested_non_negative"),
    )

    district_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    cursor: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime | None]
    status: Mapped[str] = mapped_column(String(16), default=PollStatus.OK, index=True)
    # Consecutive passes whose token Clever refused (401); three in a row disconnect the district.
    unauthorized_passes: Mapped[int] = mapped_column(default=0)
    # SHA-256 of the token last used, never the token: a new token lifts a disconnection.
    token_sha256: Mapped[str | None] = mapped_column(String(64))
    # New events this cursor has put into the inbox, for metrics.
    events_ingested: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_polled_at: Mapped[datetime | None]
    last_success_at: Mapped[datetime | None]
