from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base


class ObjectVersion(Base):
    """The ordering fence: the newest event applied to each Clever object.

    An event older (by Clever ``created``, then event id) than the one recorded here is stale.
    """

    __tablename__ = "object_versions"

    object_type: Mapped[str] = mapped_column(String(32), primary_key=True)
    object_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    occurred_at: Mapped[datetime]
    event_id: Mapped[str] = mapped_column(String(200))
