from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow
from models.enums import OperatorRole, sql_in

NAME_LENGTH = 64


class Operator(Base):
    """A person who operates grassroots (SPEC §5.9), made by ``grassroots operator add``.

    The token is ``<key>.<secret>``: ``key`` finds the row (a bearer carries no name), and only
    an argon2 hash of the whole token is kept.
    """

    __tablename__ = "operators"
    __table_args__ = (CheckConstraint(sql_in("role", OperatorRole), name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(32), unique=True)
    token_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime | None]
