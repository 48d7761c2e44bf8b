from __future__ import annotations

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, journal_fk, removed_index


class Enrollment(Base):
    """A student in a class.

    Coaching is not a table of its own: it exists *through* a class (every live teacher of a live
    class coaches every student enrolled in it), so it is read from ``class_teachers`` and
    ``enrollments`` and can never outlive the class link it came from. See ``tasks.view``.
    """

    __tablename__ = "enrollments"
    __table_args__ = (removed_index("enrollments"),)

    class_id: Mapped[str] = mapped_column(
        ForeignKey("classes.id", ondelete="CASCADE"), primary_key=True
    )
    student_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    removed_by: Mapped[int | None] = journal_fk()
