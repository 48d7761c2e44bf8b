from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, utcnow


class AuditRecord(Base):
    """Who did what and why: conversions, holds, releases, replays, restores."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(200))
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
