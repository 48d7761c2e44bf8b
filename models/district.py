from __future__ import annotations

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, TimestampMixin

DISTRICT_STATUSES = ("active", "exited")
ADMIN_REMOVAL_POLICIES = ("convert", "remove")


class District(TimestampMixin, Base):
    """A Clever district in (or formerly in) the district program."""

    __tablename__ = "districts"
    __table_args__ = (
        CheckConstraint(f"status IN {DISTRICT_STATUSES!r}", name="status"),
        CheckConstraint(f"admin_removal IN {ADMIN_REMOVAL_POLICIES!r}", name="admin_removal"),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), default="active")
    admin_removal: Mapped[str] = mapped_column(String(16), default="convert")
