from __future__ import annotations

from sqlalchemy import CheckConstraint, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, TimestampMixin
from models.enums import AccountKind, AccountStatus, Role, sql_in


class Account(TimestampMixin, Base):
    """A platform account. ``id`` is the Clever user id for rostered people, else our own id."""

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint(sql_in("kind", AccountKind), name="kind"),
        CheckConstraint(sql_in("status", AccountStatus), name="status"),
        # A district account belongs to a district and came from Clever; a grassroots one has none.
        CheckConstraint(
            f"(kind = '{AccountKind.DISTRICT}' AND district_id IS NOT NULL"
            " AND clever_id IS NOT NULL)"
            f" OR (kind = '{AccountKind.GRASSROOTS}' AND district_id IS NULL)",
            name="kind_district",
        ),
        # Anyone who can log in holds a role.
        CheckConstraint(
            f"status = '{AccountStatus.REMOVED}' OR is_admin OR is_teacher OR is_student",
            name="active_has_role",
        ),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    clever_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(500))
    is_admin: Mapped[bool] = mapped_column(default=False)
    is_teacher: Mapped[bool] = mapped_column(default=False)
    is_student: Mapped[bool] = mapped_column(default=False)
    kind: Mapped[str] = mapped_column(String(16), default=AccountKind.DISTRICT)
    status: Mapped[str] = mapped_column(String(16), default=AccountStatus.ACTIVE)
    district_id: Mapped[str | None] = mapped_column(
        ForeignKey("districts.id", ondelete="RESTRICT"), index=True
    )

    @property
    def roles(self) -> frozenset[Role]:
        return roles_of(self.is_admin, self.is_teacher, self.is_student)


# The role flags, in the order ``roles_of`` takes them. Roles are stored as flags (an account is
# found by role with a plain index); these two functions are the only translation.
ROLE_COLUMNS = ("is_admin", "is_teacher", "is_student")
_ROLE_ORDER = (Role.ADMIN, Role.TEACHER, Role.STUDENT)


def roles_of(is_admin: object, is_teacher: object, is_student: object) -> frozenset[Role]:
    """The roles an account's flags stand for."""
    flags = (is_admin, is_teacher, is_student)
    return frozenset(role for role, held in zip(_ROLE_ORDER, flags, strict=True) if held)


def role_flags(roles: frozenset[Role] | set[Role]) -> dict[str, bool]:
    """The flag columns for a set of roles."""
    return {column: role in roles for column, role in zip(ROLE_COLUMNS, _ROLE_ORDER, strict=True)}
