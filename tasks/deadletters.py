"""Dead letters and replay (SPEC §6): a task that fails for good is kept in SQL with everything it
takes to run it again, and an operator sends it round again by the same id.

Replaying something already applied is a no-op; replays asked at once send it once.
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, literal, select, tuple_, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models import (
    AuditAction,
    AuditRecord,
    DeadLetter,
    DistrictExit,
    EventStatus,
    RosterEvent,
    utcnow,
)
from tasks.attempts import Ledger, unit_subject
from tasks.errors import NotFound
from tasks.sql import in_ids

UNIT_PREFIX = unit_subject(0, "").split(":")[0] + ":"
TRACEBACK_CHARS = 20000
ERROR_CHARS = 5000


def describe(exc: BaseException) -> tuple[str, str]:
    """An exception's class and message, for a dead letter, a log line or an operator. A
    database error is named by its driver error and the driver's primary message: never the
    statement's parameters nor the detail line, which can quote a row's values (personal data)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        orig = exc.orig
        primary = getattr(getattr(orig, "diag", None), "message_primary", None)
        message = primary if isinstance(primary, str) else str(orig).split("\n", 1)[0]
        return type(orig).__name__, message[:ERROR_CHARS]
    return type(exc).__name__, str(exc)[:ERROR_CHARS]


def record(
    session: Session,
    *,
    task: str,
    args: dict[str, Any],
    ledger: Ledger,
    exc: BaseException,
    reason: str,
    attempts: int,
    host: str | None = None,
) -> bool:
    """Keep the failure, and mark its subject dead (``Ledger.mark_dead``); False, and nothing
    written, if the subject finished meanwhile (a late copy failed: finished work stands). A
    replay that fails again lands on the same dead letter, its count raised."""
    error = f"{reason}: {describe(exc)[1]}"
    if not ledger.mark_dead(session, error[:500]):
        return False
    now = utcnow()
    exception, message = describe(exc)
    tb = _traceback(exc)
    letter = session.scalar(
        select(DeadLetter)
        .where(
            DeadLetter.event_id == ledger.event_id
            if ledger.event_id is not None
            else DeadLetter.subject == ledger.subject()
        )
        .order_by(DeadLetter.id.desc())
        .limit(1)
        .with_for_update()
    )
    if letter is None:
        session.add(
            DeadLetter(
                event_id=ledger.event_id,
                subject=ledger.subject(),
                task=task,
                args=args,
                reason=reason,
                exception=exception,
                error=message,
                traceback=tb,
                attempts=attempts,
                host=host,
                first_failed_at=now,
                last_failed_at=now,
            )
        )
    else:
        letter.attempts += attempts
        letter.reason, letter.exception, letter.error = reason, exception, message
        letter.traceback, letter.host = tb, host
        letter.last_failed_at, letter.resolved_at = now, None
    return True


def _traceback(exc: BaseException) -> str:
    """The traceback, with each frame; the exception's own text as ``describe`` gives it."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    exception, message = describe(exc)
    return f"Traceback (most recent call last):\n{frames}{exception}: {message}"[-TRACEBACK_CHARS:]


def open_letter(session: Session, subject: str) -> DeadLetter | None:
    return session.scalar(
        select(DeadLetter).where(DeadLetter.subject == subject, DeadLetter.resolved_at.is_(None))
    )


def resolve(session: Session, subjects: Sequence[str]) -> int:
    """Close the open dead letters of these subjects: an operator sent them round again."""
    result = session.execute(
        update(DeadLetter)
        .where(DeadLetter.subject.in_(subjects), DeadLetter.resolved_at.is_(None))
        .values(resolved_at=utcnow())
    )
    return int(getattr(result, "rowcount", 0) or 0)


# What ``mark_replay`` answers when the event goes round again, or why it does not:
# ``already_final`` (replaying an applied event is a no-op), ``held`` (the brake's: released with
# ``held release``), ``in_flight`` (queued or being processed already, as after a concurrent
# replay: a second copy would only count attempts against the first; if its worker is lost, the
# relay sends it again).
REPLAYED = EventStatus.ACCEPTED
ALREADY_FINAL = "already_final"
HELD = EventStatus.HELD
DEFERRED = EventStatus.DEFERRED
IN_FLIGHT = "in_flight"


# Dead events sent round again per transaction by ``replay --status dead``: a page's statements
# and locks stay small however many are dead.
REPLAY_PAGE = 500


def mark_replay(session: Session, event_id: str, *, by: str) -> str:
    """Send a dead event round again by the same id; say what became of the request."""
    if _replay(session, [event_id], by=by):
        return REPLAYED
    status = session.scalar(select(RosterEvent.status).where(RosterEvent.id == event_id))
    if status is None:
        raise NotFound(f"no event {event_id}")
    if status in EventStatus.final():
        return ALREADY_FINAL
    if status in (HELD, DEFERRED):
        return str(status)
    return IN_FLIGHT


def _replay(session: Session, event_ids: Sequence[str], *, by: str) -> list[str]:
    """Send those of ``event_ids`` that are dead round again; their ids."""
    # One statement decides, on either backend (SQLite takes no row locks): of replays at once,
    # one finds the event dead. A fresh budget of attempts; the dead letter is closed, and a new
    # failure reopens it with its count raised.
    now = utcnow()
    taken = set(
        session.scalars(
            update(RosterEvent)
            .where(in_ids(RosterEvent.id, event_ids), RosterEvent.status == EventStatus.DEAD)
            .values(status=EventStatus.ACCEPTED, attempts=0, updated_at=now)
            .returning(RosterEvent.id)
        )
    )
    # In the order asked (RETURNING keeps none): sent oldest first.
    replayed = [event_id for event_id in event_ids if event_id in taken]
    if not replayed:
        return []
    session.execute(
        update(DeadLetter)
        .where(in_ids(DeadLetter.event_id, replayed), DeadLetter.resolved_at.is_(None))
        .values(resolved_at=now)
    )
    session.execute(
        insert(AuditRecord),
        [
            {
                "action": AuditAction.REPLAY,
                "trigger": by,
                "subject_type": "event",
                "subject_id": event_id[:64],
                "details": {"was": EventStatus.DEAD},
            }
            for event_id in replayed
        ],
    )
    return replayed


# Where a page of dead events ended, in the order they were received: (received_at, id).
PageKey = tuple[datetime, str]


def replay_dead_page(
    session: Session,
    *,
    by: str,
    after: PageKey | None = None,
    type_: str | None = None,
    district_id: str | None = None,
    limit: int = REPLAY_PAGE,
) -> tuple[list[str], PageKey | None]:
    """Send round again the next ``limit`` dead events (of one type, of one district) received
    after ``after``, oldest first: the ids replayed, and the key the next page starts after
    (None: there is none). Keyset pages through the (status, received_at) index: a page costs
    the same however long the inbox's history, and an event that dies again while the pages go
    on is not picked up twice."""
    query = select(RosterEvent.id, RosterEvent.received_at).where(
        RosterEvent.status == EventStatus.DEAD
    )
    if type_:
        query = query.where(RosterEvent.type == type_)
    if district_id:
        query = query.where(RosterEvent.district_id == district_id)
    if after is not None:
        query = query.where(
            tuple_(RosterEvent.received_at, RosterEvent.id)
            > tuple_(literal(after[0]), literal(after[1]))
        )
    rows = (
        session.execute(query.order_by(RosterEvent.received_at, RosterEvent.id).limit(limit))
        .tuples()
        .all()
    )
    if not rows:
        return [], None
    replayed = _replay(session, [event_id for event_id, _ in rows], by=by)
    last_id, last_at = rows[-1]
    return replayed, (last_at, last_id) if len(rows) == limit else None


def _error_class() -> Any:
    """A dead letter's error class: its exception's, or its reason when none was kept."""
    return func.coalesce(DeadLetter.exception, DeadLetter.reason)


def groups(session: Session) -> list[dict[str, Any]]:
    """Open dead letters grouped by task and error class, the largest group first: each with
    its count, first and last failure, how many are events (what ``replay_group`` sends), the
    districts of its dead exit units, and ``up_to``, the highest id in it (a confirmation
    carries it, so a later arrival is not swept in)."""
    error = _error_class().label("error")
    rows = session.execute(
        select(
            DeadLetter.task,
            error,
            func.count().label("count"),
            func.count(DeadLetter.event_id).label("events"),
            func.min(DeadLetter.first_failed_at).label("first"),
            func.max(DeadLetter.last_failed_at).label("last"),
            func.max(DeadLetter.id).label("up_to"),
        )
        .where(DeadLetter.resolved_at.is_(None))
        .group_by(DeadLetter.task, error)
        .order_by(func.count().desc(), DeadLetter.task, error)
    ).all()
    units = _dead_unit_districts(session)
    return [
        {
            "task": r.task,
            "error": r.error,
            "count": r.count,
            "events": r.events,
            "first_failed_at": r.first.isoformat(),
            "last_failed_at": r.last.isoformat(),
            "up_to": r.up_to,
            "districts": sorted(units.get((r.task, r.error), set())),
        }
        for r in rows
    ]


def _dead_unit_districts(session: Session) -> dict[tuple[str, str], set[str]]:
    """The districts of the open dead letters of exit units (``exit_unit:<exit>:<key>``), by
    group."""
    error = _error_class().label("error")
    rows = session.execute(
        select(DeadLetter.task, error, DeadLetter.subject).where(
            DeadLetter.resolved_at.is_(None), DeadLetter.subject.like(f"{UNIT_PREFIX}%")
        )
    ).all()
    wanted = {int(subject.split(":")[1]) for _, _, subject in rows}
    district_of = dict(
        session.execute(
            select(DistrictExit.id, DistrictExit.district_id).where(
                DistrictExit.id.in_(sorted(wanted))
            )
        )
        .tuples()
        .all()
    )
    found: dict[tuple[str, str], set[str]] = {}
    for task, err, subject in rows:
        district = district_of.get(int(subject.split(":")[1]))
        if district is not None:
            found.setdefault((task, err), set()).add(district)
    return found


def group_events(session: Session, *, task: str, error: str, up_to: int) -> list[str]:
    """The events of a group's open dead letters as a confirmation saw them (ids up to
    ``up_to``), oldest failure first: what Replay all sends."""
    return list(
        session.scalars(
            select(DeadLetter.event_id)
            .where(
                DeadLetter.resolved_at.is_(None),
                DeadLetter.task == task,
                _error_class() == error,
                DeadLetter.id <= up_to,
                DeadLetter.event_id.is_not(None),
            )
            .order_by(DeadLetter.first_failed_at, DeadLetter.id)
        )
    )
