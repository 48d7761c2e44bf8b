from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow


class Heartbeat(Base):
    """When a worker last ran the heartbeat task that beat sends: proof that the pipeline takes
    work, which a process-alive check cannot give (SPEC §5.5 ``/readyz``)."""

    __tablename__ = "heartbeats"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    host: Mapped[str | None] = mapped_column(String(200))
