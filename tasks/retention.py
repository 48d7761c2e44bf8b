"""Retention (SPEC §3): what is kept for ``RETENTION_DAYS`` and no longer.

Removed rows are hard-deleted once their journal entry is older than the window
(``tasks.conversion.purge``), and so is the personal data the pipeline keeps along the way:

- an inbox event's raw Clever payload (names, emails) and its error, once the event is final and
  has been so for the window: the row stays, as its id, type, object, status and times;
- a dead letter an operator resolved that long ago (an open one stays whole until an operator
  acts on it: it is the way back, and its event keeps its payload for the replay);
- the details of audit rows that old: the rows stay, as who did what to which id and why;
- the attempt counts of task messages first seen that long ago, and the requests (an exit's
  start, a sync) that finished that long ago.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Text, cast, delete, update
from sqlalchemy.orm import Session

from models import AuditRecord, DeadLetter, EventStatus, RosterEvent, utcnow
from tasks import operator_requests
from tasks.attempts import forget_messages
from tasks.conversion import purge as purge_removed

EMPTY = "{}"


@dataclass(frozen=True)
class Purged:
    """How many of each were purged or stripped."""

    journal_entries: int
    event_payloads: int
    dead_letters: int
    audit_details: int
    task_attempts: int
    operator_requests: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def purge(session: Session, *, retention_days: int, now: datetime | None = None) -> Purged:
    """Everything past the window, in the caller's transaction."""
    now = now or utcnow()
    cutoff = now - timedelta(days=retention_days)
    journal = purge_removed(session, retention_days=retention_days, now=now)
    payloads = _rowcount(
        session.execute(
            update(RosterEvent)
            .where(
                RosterEvent.status.in_(EventStatus.final()),
                RosterEvent.updated_at < cutoff,
                (cast(RosterEvent.payload, Text) != EMPTY) | RosterEvent.error.is_not(None),
            )
            # ``updated_at`` stays: it says when the event became final, not when it was purged.
            .values(payload={}, error=None, updated_at=RosterEvent.updated_at)
            .execution_options(synchronize_session=False)
        )
    )
    letters = _rowcount(
        session.execute(
            delete(DeadLetter)
            .where(DeadLetter.resolved_at < cutoff)
            .execution_options(synchronize_session=False)
        )
    )
    details = _rowcount(
        session.execute(
            update(AuditRecord)
            .where(AuditRecord.at < cutoff, cast(AuditRecord.details, Text) != EMPTY)
            .values(details={})
            .execution_options(synchronize_session=False)
        )
    )
    attempts = forget_messages(session, before=cutoff)
    requests = operator_requests.forget(session, before=cutoff)
    return Purged(journal, payloads, letters, details, attempts, requests)


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
