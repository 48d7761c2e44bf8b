from __future__ import annotations

from sqlalchemy import CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, TimestampMixin, journal_fk, removed_index


class Class(TimestampMixin, Base):
    """A class: district-synced (a Clever section, id = section id) or independent."""

    __tablename__ = "classes"
    __table_args__ = (
        removed_index("classes"),
        CheckConstraint(
            "(district_synced AND district_id IS NOT NULL)"
            " OR (NOT district_synced AND district_id IS NULL)",
            name="synced_has_district",
        ),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(500))
    district_synced: Mapped[bool] = mapped_column(index=True)
    district_id: Mapped[str | None] = mapped_column(
        ForeignKey("districts.id", ondelete="RESTRICT"), index=True
    )
    removed_by: Mapped[int | None] = journal_fk()
