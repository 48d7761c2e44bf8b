from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, utcnow
from models.enums import SyncStatus, sql_in


class RosterSync(Base):
    """One roster sync of a district from the Clever Data API (SPEC §5.8): what it pulled, what it
    found changed, and where the district's event feed stood when it started."""

    __tablename__ = "roster_syncs"
    __table_args__ = (CheckConstraint(sql_in("status", SyncStatus), name="status"),)

    # Names the inbox events it records: ``sync:<id>:<type>:<object id>``.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    district_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    status: Mapped[str] = mapped_column(String(16), default=SyncStatus.RUNNING)
    dry_run: Mapped[bool] = mapped_column(default=False)
    trigger: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    # The newest event of the district's feed before the pull: the poller goes on from there.
    feed_position: Mapped[str | None] = mapped_column(String(200))
    pulled_users: Mapped[int] = mapped_column(default=0)
    pulled_sections: Mapped[int] = mapped_column(default=0)
    changes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    held: Mapped[int] = mapped_column(default=0)
    started_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None]
