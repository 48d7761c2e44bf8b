from __future__ import annotations

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, journal_fk, removed_index


class ClassTeacher(Base):
    """A teacher of a class; a Clever section can have several (co-teachers)."""

    __tablename__ = "class_teachers"
    __table_args__ = (removed_index("class_teachers"),)

    class_id: Mapped[str] = mapped_column(
        ForeignKey("classes.id", ondelete="CASCADE"), primary_key=True
    )
    teacher_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    removed_by: Mapped[int | None] = journal_fk()
