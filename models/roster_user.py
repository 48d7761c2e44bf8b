from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, utcnow


class RosterUser(Base):
    """The mirror of a Clever user, whatever its roles (SPEC §4): who the district's roster lists,
    and with which of Clever's roles. A user holding a platform role (district admin, teacher,
    student) also has an account; a staff member or a contact only this row. Only ids and roles:
    names and emails live on the account, for those who have one."""

    __tablename__ = "roster_users"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    district_id: Mapped[str] = mapped_column(
        ForeignKey("districts.id", ondelete="RESTRICT"), index=True
    )
    # Clever's role names, sorted (``models.enums.CleverRole``).
    roles: Mapped[list[str]] = mapped_column(default=list)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
