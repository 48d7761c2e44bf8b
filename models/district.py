from __future__ import annotations

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import ID_LENGTH, Base, TimestampMixin
from models.enums import AdminRemoval, DistrictStatus, sql_in


class District(TimestampMixin, Base):
    """A Clever district in (or formerly in) the district program."""

    __tablename__ = "districts"
    __table_args__ = (
        CheckConstraint(sql_in("status", DistrictStatus), name="status"),
        CheckConstraint(sql_in("admin_removal", AdminRemoval), name="admin_removal"),
        CheckConstraint(
            "brake_percent IS NULL OR (brake_percent > 0 AND brake_percent <= 100)",
            name="brake_percent_range",
        ),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(500))
    status: Mapped[str] = mapped_column(String(16), default=DistrictStatus.ACTIVE)
    admin_removal: Mapped[str] = mapped_column(String(16), default=AdminRemoval.CONVERT)
    # The district's own removal brake, in percent of its accounts a day; None: the deployment's
    # REMOVAL_BRAKE_PERCENT.
    brake_percent: Mapped[float | None]
