"""Dead events as a worker leaves them: the inbox row dead, and its open dead letter."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from models import DeadLetter, RosterEvent, utcnow

EVENT_TASK = "grassroots.process_event"


def inbox_event(
    session: Session,
    event_id: str,
    status: str,
    *,
    type_: str,
    district: str | None,
    received_at: datetime,
) -> None:
    """An inbox row in ``status`` after eight attempts, last changed when it was received."""
    session.add(
        RosterEvent(
            id=event_id,
            type=type_,
            district_id=district,
            payload={},
            status=status,
            attempts=8,
            received_at=received_at,
            updated_at=received_at,
        )
    )
    session.flush()


def dead_event(
    session: Session,
    event_id: str,
    exception: str,
    *,
    minutes_ago: int = 0,
    error: str = "it broke",
    type_: str = "users.deleted",
    district: str | None = None,
    received_at: datetime | None = None,
) -> DeadLetter:
    at = utcnow() - timedelta(minutes=minutes_ago)
    inbox_event(
        session,
        event_id,
        "dead",
        type_=type_,
        district=district,
        received_at=received_at or utcnow(),
    )
    letter = DeadLetter(
        event_id=event_id,
        task=EVENT_TASK,
        reason="retries_exhausted",
        exception=exception,
        error=error,
        traceback=f"Traceback (most recent call last):\n{exception}: {error}",
        attempts=8,
        first_failed_at=at,
        last_failed_at=at + timedelta(seconds=30),
    )
    session.add(letter)
    session.flush()
    return letter
