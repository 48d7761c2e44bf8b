"""Where each kind of task counts its attempts in SQL, and marks its terminal failure.

The count is committed before the work starts, so a task that kills its worker every time is
still capped: Celery's own retry count lives in the message and starts again when the message
is redelivered. Each ledger also knows when there is nothing left to do (its event or unit has
finished, or is waiting for an operator): a redelivered copy then returns at once.
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import bindparam, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from models import EventStatus, ExitUnit, RosterEvent, UnitStatus, utcnow
from tasks.sql import AsyncCommit


class Ledger(Protocol):
    """The attempt counter and failure mark of one task's subject."""

    # The inbox event the task works on, if any: its dead letter is linked to it, and a replay
    # finds it by it.
    event_id: str | None

    def log_ids(self) -> dict[str, Any]:
        """The ids to bind to every log line of the task (never personal data)."""
        ...

    def bump(self, conn: Connection) -> int | None:
        """Count one more attempt (committed on its own) and return the count; None if there is
        nothing to do (finished, waiting for an operator, or gone)."""
        ...

    def mark_dead(self, session: Session, error: str) -> None:
        """Record that the subject failed for good (in the dead letter's transaction)."""
        ...


class EventLedger:
    """``process_event``: the inbox row's own ``attempts`` and status."""

    def __init__(self, event_id: str) -> None:
        self.event_id: str | None = event_id

    def log_ids(self) -> dict[str, Any]:
        return {"event_id": self.event_id}

    def bump(self, conn: Connection) -> int | None:
        # Commits without the WAL wait (``AsyncCommit``): an increment lost in a crash of
        # Postgres itself only allows one more attempt.
        attempts: int | None = conn.scalar(
            update(RosterEvent)
            .where(
                RosterEvent.id == self.event_id,
                RosterEvent.status.in_(EventStatus.in_flight()),
            )
            .values(
                attempts=RosterEvent.attempts + 1,
                status=EventStatus.PROCESSING,
                updated_at=utcnow(),
            )
            .returning(RosterEvent.attempts, AsyncCommit())
        )
        return attempts

    def mark_dead(self, session: Session, error: str) -> None:
        session.execute(
            update(RosterEvent)
            .where(RosterEvent.id == self.event_id)
            .values(status=EventStatus.DEAD, error=error, updated_at=utcnow())
        )


# One exit unit, by its bound parameters (``unit_params``); ``tasks.exits`` builds its statements
# on the same ones, so the counter and the unit can share one round trip.
THIS_UNIT = (ExitUnit.exit_id == bindparam("unit_exit"), ExitUnit.key == bindparam("unit_key"))
BUMP_UNIT = (
    update(ExitUnit)
    .where(*THIS_UNIT, ExitUnit.status == UnitStatus.PENDING)
    .values(attempts=ExitUnit.attempts + 1)
    .returning(ExitUnit.attempts, AsyncCommit())
)


def unit_params(exit_id: int, key: str) -> dict[str, Any]:
    return {"unit_exit": exit_id, "unit_key": key}


class UnitLedger:
    """``exit_unit``: the unit row's ``attempts`` and status."""

    event_id: str | None = None

    def __init__(self, exit_id: int, key: str) -> None:
        self.exit_id = exit_id
        self.key = key

    def log_ids(self) -> dict[str, Any]:
        return {"exit_id": self.exit_id, "unit": self.key}

    def bump(self, conn: Connection) -> int | None:
        attempts: int | None = conn.scalar(BUMP_UNIT, unit_params(self.exit_id, self.key))
        return attempts

    def mark_dead(self, session: Session, error: str) -> None:
        session.execute(
            update(ExitUnit)
            .where(ExitUnit.exit_id == self.exit_id, ExitUnit.key == self.key)
            .values(status=UnitStatus.DEAD)
        )


class Uncounted:
    """Tasks whose every attempt is allowed (the exit's start and finish, housekeeping)."""

    event_id: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ids = {k: v for k, v in kwargs.items() if isinstance(v, str | int)}

    def log_ids(self) -> dict[str, Any]:
        return self.ids

    def bump(self, conn: Connection) -> int | None:
        return 1

    def mark_dead(self, session: Session, error: str) -> None:
        return None
