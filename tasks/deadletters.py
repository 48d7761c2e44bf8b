"""Dead letters and replay (SPEC §6): a task that fails for good is kept in SQL with everything it
takes to run it again, and an operator sends it round again by the same id.

Replaying something already applied is a no-op; replays asked at once send it once.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import AuditRecord, DeadLetter, EventStatus, RosterEvent, utcnow
from tasks.attempts import Ledger
from tasks.errors import NotFound

TRACEBACK_CHARS = 20000
ERROR_CHARS = 5000


def record(
    session: Session,
    *,
    task: str,
    args: dict[str, Any],
    ledger: Ledger,
    exc: BaseException,
    reason: str,
    attempts: int,
) -> None:
    """Keep the failure, and mark its subject dead (``Ledger.mark_dead``). A replay that fails
    again lands on the same dead letter, its count raised."""
    now = utcnow()
    tb = "".join(traceback.format_exception(exc))[-TRACEBACK_CHARS:]
    error = str(exc)[:ERROR_CHARS]
    letter = None
    if ledger.event_id is not None:
        letter = session.scalar(
            select(DeadLetter)
            .where(DeadLetter.event_id == ledger.event_id)
            .order_by(DeadLetter.id.desc())
            .limit(1)
            .with_for_update()
        )
    if letter is None:
        session.add(
            DeadLetter(
                event_id=ledger.event_id,
                task=task,
                args=args,
                reason=reason,
                error=error,
                traceback=tb,
                attempts=attempts,
                first_failed_at=now,
                last_failed_at=now,
            )
        )
    else:
        letter.attempts += attempts
        letter.reason, letter.error, letter.traceback = reason, error, tb
        letter.last_failed_at, letter.resolved_at = now, None
    ledger.mark_dead(session, f"{reason}: {error[:500]}")


# What ``mark_replay`` answers when the event goes round again, or why it does not:
# ``already_final`` (replaying an applied event is a no-op), ``held`` (the brake's: released with
# ``held release``), ``in_flight`` (queued or being processed already, as after a concurrent
# replay: a second copy would only count attempts against the first; if its worker is lost, the
# relay sends it again).
REPLAYED = EventStatus.ACCEPTED
ALREADY_FINAL = "already_final"
HELD = EventStatus.HELD
IN_FLIGHT = "in_flight"


def mark_replay(session: Session, event_id: str, *, by: str) -> str:
    """Send a dead event round again by the same id; say what became of the request."""
    # One statement decides, on either backend (SQLite takes no row locks): of replays at once,
    # one finds the event dead. A fresh budget of attempts; the dead letter is closed, and a new
    # failure reopens it with its count raised.
    replayed = session.execute(
        update(RosterEvent)
        .where(RosterEvent.id == event_id, RosterEvent.status == EventStatus.DEAD)
        .values(status=EventStatus.ACCEPTED, attempts=0, updated_at=utcnow())
        .returning(RosterEvent.id)
    ).first()
    if replayed is None:
        status = session.scalar(select(RosterEvent.status).where(RosterEvent.id == event_id))
        if status is None:
            raise NotFound(f"no event {event_id}")
        if status in EventStatus.final():
            return ALREADY_FINAL
        return HELD if status == EventStatus.HELD else IN_FLIGHT
    session.execute(
        update(DeadLetter)
        .where(DeadLetter.event_id == event_id, DeadLetter.resolved_at.is_(None))
        .values(resolved_at=utcnow())
    )
    session.add(
        AuditRecord(
            action="replay",
            trigger=by,
            subject_type="event",
            subject_id=event_id[:64],
            details={"was": EventStatus.DEAD},
        )
    )
    return REPLAYED


def dead_events(session: Session, *, type_: str | None = None) -> Sequence[str]:
    """The ids of the dead events (of one type), oldest first: what ``replay --status dead``
    sends round again."""
    query = select(RosterEvent.id).where(RosterEvent.status == EventStatus.DEAD)
    if type_:
        query = query.where(RosterEvent.type == type_)
    return session.scalars(query.order_by(RosterEvent.received_at)).all()
