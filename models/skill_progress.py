from __future__ import annotations

from sqlalchemy import CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, TimestampMixin
from models.enums import Mastery, sql_in


class SkillProgress(TimestampMixin, Base):
    """Per student per skill. Learner-owned: no conversion ever writes this table."""

    __tablename__ = "skill_progress"
    __table_args__ = (
        CheckConstraint("points >= 0", name="points_non_negative"),
        CheckConstraint(sql_in("mastery", Mastery), name="mastery"),
    )

    student_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    skill: Mapped[str] = mapped_column(String(200), primary_key=True)
    points: Mapped[int]
    mastery: Mapped[str] = mapped_column(String(32))
