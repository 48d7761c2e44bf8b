"""Where each kind of task counts its attempts in SQL, and marks its terminal failure.

The count is committed before the work starts, so a task that kills its worker every time is
still capped: Celery's own retry count lives in the message and starts again when the message
is redelivered. Each ledger also knows when there is nothing left to do (its event or unit has
finished, or is waiting for an operator): a redelivered copy then returns at once. A failure
never overwrites finished work: a late copy that fails finds its subject done and marks nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import bindparam, delete, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from models import EventStatus, ExitUnit, RosterEvent, TaskAttempt, UnitStatus, utcnow
from tasks.sql import AsyncCommit


class Ledger(Protocol):
    """The attempt counter and failure mark of one task's subject."""

    # The inbox event the task works on, if any: its dead letter is linked to it, and a replay
    # finds it by it.
    event_id: str | None

    def subject(self) -> str:
        """What a dead letter of the task names (an operator's resume closes it by this)."""
        ...

    def log_ids(self) -> dict[str, Any]:
        """The ids to bind to every log line of the task (never personal data)."""
        ...

    def bump(self, conn: Connection, task_id: str | None) -> int | None:
        """Count one more attempt by the Celery task ``task_id`` (committed on its own) and
        return the count; None if there is nothing to do (finished, waiting for an operator, or
        gone)."""
        ...

    def mark_dead(self, session: Session, error: str) -> bool:
        """Record that the subject failed for good (in the dead letter's transaction); False
        if it has finished meanwhile (a late copy failed): then nothing is marked."""
        ...

    def reject(self, session: Session, reason: str) -> bool:
        """Record that the subject's input cannot be used, whatever is retried (a value the
        database refuses); False if that is no outcome of this subject (only an event can be
        rejected: any other work is dead-lettered) or it has finished meanwhile."""
        ...


# Built once: every event task runs it first.
BUMP_EVENT = (
    update(RosterEvent)
    .where(
        RosterEvent.id == bindparam("event"),
        RosterEvent.status.in_(EventStatus.in_flight()),
    )
    .values(
        attempts=RosterEvent.attempts + 1,
        status=EventStatus.PROCESSING,
        task_id=bindparam("task_id", type_=RosterEvent.task_id.type),
        updated_at=bindparam("now", type_=RosterEvent.updated_at.type),
    )
    .returning(RosterEvent.attempts, AsyncCommit())
)


class EventLedger:
    """``process_event``: the inbox row's own ``attempts`` and status."""

    def __init__(self, event_id: str) -> None:
        self.event_id: str | None = event_id

    def subject(self) -> str:
        return f"event:{self.event_id}"

    def log_ids(self) -> dict[str, Any]:
        return {"event_id": self.event_id}

    def bump(self, conn: Connection, task_id: str | None) -> int | None:
        # Commits without the WAL wait (``AsyncCommit``): an increment lost in a crash of
        # Postgres itself only allows one more attempt.
        attempts: int | None = conn.scalar(
            BUMP_EVENT, {"event": self.event_id, "task_id": task_id, "now": utcnow()}
        )
        return attempts

    def mark_dead(self, session: Session, error: str) -> bool:
        return self._finish(session, EventStatus.DEAD, error)

    def reject(self, session: Session, reason: str) -> bool:
        return self._finish(session, EventStatus.REJECTED, reason)

    def _finish(self, session: Session, status: EventStatus, error: str) -> bool:
        marked = session.execute(
            update(RosterEvent)
            .where(
                RosterEvent.id == self.event_id,
                RosterEvent.status.in_(EventStatus.in_flight()),
            )
            .values(status=status, error=error, updated_at=utcnow())
            .returning(RosterEvent.id)
        ).first()
        return marked is not None


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


def unit_subject(exit_id: int, key: str) -> str:
    return f"exit_unit:{exit_id}:{key}"


class UnitLedger:
    """``exit_unit``: the unit row's ``attempts`` and status."""

    event_id: str | None = None

    def __init__(self, exit_id: int, key: str) -> None:
        self.exit_id = exit_id
        self.key = key

    def subject(self) -> str:
        return unit_subject(self.exit_id, self.key)

    def log_ids(self) -> dict[str, Any]:
        return {"exit_id": self.exit_id, "unit": self.key}

    def bump(self, conn: Connection, task_id: str | None) -> int | None:
        attempts: int | None = conn.scalar(BUMP_UNIT, unit_params(self.exit_id, self.key))
        return attempts

    def mark_dead(self, session: Session, error: str) -> bool:
        marked = session.execute(
            update(ExitUnit)
            .where(
                ExitUnit.exit_id == self.exit_id,
                ExitUnit.key == self.key,
                ExitUnit.status == UnitStatus.PENDING,
            )
            .values(status=UnitStatus.DEAD)
            .returning(ExitUnit.key)
        ).first()
        return marked is not None

    def reject(self, session: Session, reason: str) -> bool:
        return False


class MessageLedger:
    """A task with no row of its own to count on (an exit's start and finish, a sync, the
    periodic tasks): its message's attempts, by its Celery task id, which the message keeps
    across retries and redeliveries."""

    event_id: str | None = None

    def __init__(self, task: str, task_id: str, ids: dict[str, Any]) -> None:
        self.task, self.task_id, self.ids = task, task_id, ids

    def subject(self) -> str:
        return task_subject(self.task, self.task_id)

    def log_ids(self) -> dict[str, Any]:
        return self.ids

    def bump(self, conn: Connection, task_id: str | None) -> int | None:
        now = utcnow()
        insert = (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(TaskAttempt)
        statement = insert.values(
            task_id=self.task_id, task=self.task, attempts=1, first_at=now, last_at=now
        )
        attempts: int | None = conn.scalar(
            statement.on_conflict_do_update(
                index_elements=[TaskAttempt.task_id],
                set_={"attempts": TaskAttempt.attempts + 1, "last_at": now},
            ).returning(TaskAttempt.attempts)
        )
        return attempts

    def mark_dead(self, session: Session, error: str) -> bool:
        return True

    def reject(self, session: Session, reason: str) -> bool:
        return False


def task_subject(task: str, task_id: str) -> str:
    """What the dead letter of a task message names."""
    return f"{task}:{task_id}"


def forget_messages(session: Session, *, before: datetime) -> int:
    """The attempts of messages first seen before ``before``: long finished or given up."""
    result = session.execute(delete(TaskAttempt).where(TaskAttempt.first_at < before))
    return int(getattr(result, "rowcount", 0) or 0)
