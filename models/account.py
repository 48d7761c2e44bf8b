from __future__ import annotations

from sqlalchemy import CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, TimestampMixin

ACCOUNT_KINDS = ("district", "grassroots")
ACCOUNT_STATUSES = ("active", "removed")
ROLES = ("admin", "teacher", "student")


class Account(TimestampMixin, Base):
    """A platform account. ``id`` is the Clever user id for rostered people, else our own id."""

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint(f"kind IN {ACCOUNT_KINDS!r}", name="kind"),
        CheckConstraint(f"status IN {ACCOUNT_STATUSES!r}", name="status"),
        # A district account belongs to a district and came from Clever; a grassroots one has none.
        CheckConstraint(
            "(kind = 'district' AND district_id IS NOT NULL AND clever_id IS NOT NULL)"
            " OR (kind = 'grassroots' AND district_id IS NULL)",
            name="kind_district",
        ),
        # Anyone who can log in holds a role.
        CheckConstraint(
            "status = 'removed' OR is_admin OR is_teacher OR is_student", name="active_has_role"
        ),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    clever_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(500))
    is_admin: Mapped[bool] = mapped_column(default=False)
    is_teacher: Mapped[bool] = mapped_column(default=False)
    is_student: Mapped[bool] = mapped_column(default=False)
    kind: Mapped[str] = mapped_column(String(16), default="district")
    status: Mapped[str] = mapped_column(String(16), default="active")
    district_id: Mapped[str | None] = mapped_column(
        ForeignKey("districts.id", ondelete="RESTRICT"), index=True
    )

    @property
    def roles(self) -> list[str]:
        held = {"admin": self.is_admin, "teacher": self.is_teacher, "student": self.is_student}
        return sorted(role for role, has in held.items() if has)
