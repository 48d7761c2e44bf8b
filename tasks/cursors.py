"""Where the Clever Events API poller stands in each district's feed (SPEC §5.3): the cursor rows
(``models.PollCursor``) and every statement on them. The poller (``worker.poller``) reads Clever
and decides the transactions; a roster sync moves a cursor too (``resume_from``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import PollCursor, PollStatus, utcnow
from tasks.sql import dialect_insert


@dataclass(frozen=True)
class CursorStart:
    """A district's cursor as a pass begins."""

    cursor: str | None
    started: bool
    status: str
    last_success_at: datetime | None
    # Its token changed while it was disconnected: it is polled again.
    reconnected: bool


def _ensure(session: Session, district_id: str, now: datetime) -> None:
    """The district's cursor row, made on its first use."""
    session.execute(
        dialect_insert(session, PollCursor)
        .values(
            district_id=district_id,
            status=PollStatus.OK,
            unauthorized_passes=0,
            events_ingested=0,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing()
    )


def _locked(session: Session, district_id: str) -> PollCursor:
    row = session.scalar(
        select(PollCursor).where(PollCursor.district_id == district_id).with_for_update()
    )
    assert row is not None
    return row


def begin_pass(
    session: Session, district_id: str, fingerprint: str, *, from_start: bool
) -> CursorStart:
    """A pass begins: the district's cursor row (made on its first pass), noticing a new token
    (``fingerprint``, its SHA-256), which lifts a disconnection."""
    now = utcnow()
    _ensure(session, district_id, now)
    row = _locked(session, district_id)
    reconnected = False
    if row.token_sha256 != fingerprint:
        if row.token_sha256 is not None and row.status == PollStatus.DISCONNECTED:
            reconnected = True
            row.status, row.unauthorized_passes = PollStatus.OK, 0
        row.token_sha256 = fingerprint
    if from_start and row.started_at is None:
        # A replay that fails half-way resumes from its cursor, not from the newest event.
        row.started_at = now
    row.last_polled_at = row.updated_at = now
    return CursorStart(
        row.cursor, row.started_at is not None, row.status, row.last_success_at, reconnected
    )


def move_past_page(
    session: Session, district_id: str, *, expected: str | None, cursor: str, new: int
) -> bool:
    """Move the cursor past a page whose ``new`` events are stored in this transaction, from
    ``expected`` only: False if another poller moved it meanwhile."""
    now = utcnow()
    moved = session.scalar(
        update(PollCursor)
        .where(
            PollCursor.district_id == district_id,
            PollCursor.cursor.is_not_distinct_from(expected),
        )
        .values(
            cursor=cursor,
            events_ingested=PollCursor.events_ingested + new,
            last_success_at=now,
            updated_at=now,
        )
        .returning(PollCursor.district_id)
    )
    return moved is not None


def start_at(session: Session, district_id: str, position: str | None, *, first: bool) -> None:
    """Polling goes on after ``position`` (None: from the start of the feed), whatever the cursor
    was. ``first``: only if the district was never polled (its first pass, which another may
    have made meanwhile)."""
    now = utcnow()
    only_first = (PollCursor.started_at.is_(None),) if first else ()
    session.execute(
        update(PollCursor)
        .where(PollCursor.district_id == district_id, *only_first)
        .values(
            cursor=position,
            started_at=now,
            status=PollStatus.OK,
            unauthorized_passes=0,
            last_error=None,
            last_success_at=now,
            updated_at=now,
        )
    )


def resume_from(session: Session, district_id: str, position: str | None) -> None:
    """A roster sync committed what the district's feed held up to ``position`` (its newest
    event when the pull started; None: the feed was empty): polling goes on from there, whatever
    the cursor was (lost, or needing a resync)."""
    _ensure(session, district_id, utcnow())
    start_at(session, district_id, position, first=False)


def succeeded(session: Session, district_id: str) -> None:
    """A pass read to the end of the feed."""
    _set(session, district_id, status=PollStatus.OK, unauthorized_passes=0, last_error=None)


def failed(
    session: Session, district_id: str, error: str, *, status: PollStatus | None = None
) -> None:
    """A pass ended on ``error``; the cursor stays. ``status``: the district's new one, if it
    changes (it needs a resync)."""
    _set(session, district_id, last_error=error, **({"status": status} if status else {}))


def _set(session: Session, district_id: str, **values: object) -> None:
    session.execute(
        update(PollCursor)
        .where(PollCursor.district_id == district_id)
        .values(updated_at=utcnow(), **values)
    )


def refused(session: Session, district_id: str, error: str, *, disconnect_after: int) -> int:
    """Clever refused the district's token: the passes refused in a row, this one included. At
    ``disconnect_after`` the district is disconnected."""
    row = _locked(session, district_id)
    row.unauthorized_passes += 1
    row.last_error = error
    row.updated_at = utcnow()
    if row.unauthorized_passes >= disconnect_after:
        row.status = PollStatus.DISCONNECTED
    return row.unauthorized_passes


def reset(session: Session, district_id: str) -> bool:
    """An operator's reset: the district is polled again, from the newest event on. False if the
    district was never polled."""
    reset = session.scalar(
        update(PollCursor)
        .where(PollCursor.district_id == district_id)
        .values(
            status=PollStatus.OK,
            unauthorized_passes=0,
            cursor=None,
            started_at=None,
            last_error=None,
            updated_at=utcnow(),
        )
        .returning(PollCursor.district_id)
    )
    return reset is not None
