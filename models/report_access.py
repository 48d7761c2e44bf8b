from __future__ import annotations

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, TimestampMixin, journal_fk, removed_index


class ReportAccess(TimestampMixin, Base):
    """An admin's grant to open a district's reports. District-owned: revoked on conversion."""

    __tablename__ = "report_access"
    __table_args__ = (removed_index("report_access"),)

    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    district_id: Mapped[str] = mapped_column(
        ForeignKey("districts.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    removed_by: Mapped[int | None] = journal_fk()
