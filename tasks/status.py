"""What the database says about the pipeline, for ``grassroots status`` and ``GET /ops/status``
(the broker's side is ``worker.pipeline``), and the inbox's views for ``events list``/``show``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import (
    DeadLetter,
    DistrictExit,
    EventStatus,
    ExitStatus,
    ExitUnit,
    JournalEntry,
    PollCursor,
    PollStatus,
    RosterEvent,
    RosterSync,
    SyncStatus,
    UnitStatus,
)
from tasks.sql import count


def districts_needing_attention(
    session: Session, *, since: datetime | None = None
) -> dict[str, list[str]]:
    """Districts whose events were missed (their poll cursor needs a resync), and those whose
    last sync failed (of the syncs started after ``since``, if given: bounded by the started_at
    index, for a caller that runs often)."""
    window = () if since is None else (RosterSync.started_at >= since,)
    resync = session.scalars(
        select(PollCursor.district_id)
        .where(PollCursor.status == PollStatus.RESYNC_NEEDED)
        .order_by(PollCursor.district_id)
    ).all()
    latest = (
        select(RosterSync.district_id, func.max(RosterSync.started_at).label("started_at"))
        .where(RosterSync.dry_run.is_(False), *window)
        .group_by(RosterSync.district_id)
        .subquery()
    )
    failed = session.scalars(
        select(RosterSync.district_id)
        .join(
            latest,
            (latest.c.district_id == RosterSync.district_id)
            & (latest.c.started_at == RosterSync.started_at),
        )
        .where(RosterSync.status == SyncStatus.FAILED, RosterSync.dry_run.is_(False), *window)
        .order_by(RosterSync.district_id)
    ).all()
    return {"resync_needed": list(resync), "sync_failed": list(dict.fromkeys(failed))}


# Statuses an event leaves only through a worker, an operator or the end of a pause: few rows
# whatever the inbox's size, counted through the (status, received_at) index. The final statuses
# are the inbox's history: they are counted only over a window (``FINAL_WINDOW``).
OPEN = tuple(sorted(EventStatus.in_flight() | EventStatus.waiting()))
# What the windowed figures count (``grassroots status``'s final events, ``/metrics``'
# ``_last_24h``): events received, accounts converted, syncs started within it.
FINAL_WINDOW = timedelta(hours=24)
# A district's syncs are looked at this far back (its last one failed, its last success).
SYNC_LOOKBACK = timedelta(days=30)


@dataclass(frozen=True)
class Backlog:
    events: dict[str, int]  # by open status (``OPEN``)
    units_pending: int
    units_dead: int  # waiting for an operator's ``district resume``
    exits_running: int
    # Exits whose units are all done: still in flight until their finish step has run.
    exits_finishing: int
    dead_letters_open: int

    @property
    def events_in_flight(self) -> int:
        return sum(self.events.get(status, 0) for status in EventStatus.in_flight())


def backlog(session: Session) -> Backlog:
    """What is still open, each count through an index to the open rows only: its cost follows
    the backlog, never the inbox's or the exits' history."""
    running = DistrictExit.status == ExitStatus.RUNNING
    return Backlog(
        events=dict(
            session.execute(
                select(RosterEvent.status, func.count())
                .where(RosterEvent.status.in_(OPEN))
                .group_by(RosterEvent.status)
            )
            .tuples()
            .all()
        ),
        units_pending=count(session, ExitUnit, ExitUnit.status == UnitStatus.PENDING),
        units_dead=count(session, ExitUnit, ExitUnit.status == UnitStatus.DEAD),
        exits_running=count(session, DistrictExit, running),
        exits_finishing=count(
            session, DistrictExit, running, DistrictExit.units_done >= DistrictExit.units_total
        ),
        dead_letters_open=count(session, DeadLetter, DeadLetter.resolved_at.is_(None)),
    )


def final_since(session: Session, since: datetime) -> dict[str, int]:
    """The events received since ``since`` that are final, by status (the received_at range of
    the index: a window's worth of rows, not the history)."""
    return dict(
        session.execute(
            select(RosterEvent.status, func.count())
            .where(RosterEvent.status.in_(EventStatus.final()), RosterEvent.received_at >= since)
            .group_by(RosterEvent.status)
        )
        .tuples()
        .all()
    )


def event_row(ev: RosterEvent) -> dict[str, Any]:
    return {
        "id": ev.id,
        "type": ev.type,
        "status": ev.status,
        "attempts": ev.attempts,
        "error": ev.error,
        "received_at": ev.received_at.isoformat(),
    }


def event_statuses(session: Session, event_ids: Sequence[str]) -> dict[str, str]:
    """The statuses of the events found of ``event_ids``."""
    return dict(
        session.execute(
            select(RosterEvent.id, RosterEvent.status).where(RosterEvent.id.in_(event_ids))
        )
        .tuples()
        .all()
    )


def event_detail(session: Session, event_id: str) -> dict[str, Any] | None:
    ev = session.scalar(select(RosterEvent).where(RosterEvent.id == event_id))
    if ev is None:
        return None
    letters = session.scalars(
        select(DeadLetter).where(DeadLetter.event_id == ev.id).order_by(DeadLetter.id)
    ).all()
    return {
        **event_row(ev),
        "source": ev.source,
        "district": ev.district_id,
        "object": {"type": ev.object_type, "id": ev.object_id},
        "created": ev.occurred_at.isoformat() if ev.occurred_at else None,
        "updated_at": ev.updated_at.isoformat(),
        "dead_letters": [
            {
                "id": d.id,
                "task": d.task,
                "reason": d.reason,
                "error": d.error,
                "attempts": d.attempts,
                "first_failed_at": d.first_failed_at.isoformat(),
                "last_failed_at": d.last_failed_at.isoformat(),
                "resolved_at": d.resolved_at.isoformat() if d.resolved_at else None,
                "traceback": d.traceback,
            }
            for d in letters
        ],
    }


def list_events(
    session: Session, *, status: str | None = None, type_: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Events, newest first, as ``event_row``s."""
    query = (
        select(RosterEvent).order_by(RosterEvent.received_at.desc(), RosterEvent.id).limit(limit)
    )
    if status:
        query = query.where(RosterEvent.status == status)
    if type_:
        query = query.where(RosterEvent.type == type_)
    return [event_row(ev) for ev in session.scalars(query)]


# --------------------------------------------------------------------------------------------
# What the alerts watch (``worker.metrics``): each read bounded by an index to what is open.


def oldest_pending(session: Session) -> datetime | None:
    """When the oldest event still waiting for a worker (or being worked on) was received."""
    return session.scalar(
        select(func.min(RosterEvent.received_at)).where(
            RosterEvent.status.in_(sorted(EventStatus.in_flight()))
        )
    )


@dataclass(frozen=True)
class DeadGroup:
    count: int
    oldest: datetime  # the group's first failure


def open_dead_letters(session: Session) -> dict[tuple[str, str], DeadGroup]:
    """Open dead letters by task and reason (both bounded: the task names and the reasons are
    the code's), with each group's oldest first failure."""
    rows = session.execute(
        select(
            DeadLetter.task, DeadLetter.reason, func.count(), func.min(DeadLetter.first_failed_at)
        )
        .where(DeadLetter.resolved_at.is_(None))
        .group_by(DeadLetter.task, DeadLetter.reason)
    )
    return {(task, reason): DeadGroup(n, oldest) for task, reason, n, oldest in rows}


def poll_cursor_ages(session: Session, *, now: datetime, limit: int) -> list[tuple[str, float]]:
    """The districts whose poll cursor last moved longest ago (its last successful pass; never:
    since it was made), oldest first: at most ``limit`` of them."""
    moved = func.coalesce(PollCursor.last_success_at, PollCursor.created_at)
    rows = session.execute(
        select(PollCursor.district_id, moved).order_by(moved, PollCursor.district_id).limit(limit)
    )
    return [(district, max(0.0, (now - at).total_seconds())) for district, at in rows]


def stalled_districts(session: Session) -> list[str]:
    """The districts whose exit ``tasks.exits.progress`` calls stalled: running, not restored,
    with a dead unit (through the index of open units: dead units are few)."""
    dead = select(ExitUnit.exit_id).where(ExitUnit.status == UnitStatus.DEAD).distinct()
    return list(
        session.scalars(
            select(DistrictExit.district_id)
            .join(JournalEntry, JournalEntry.id == DistrictExit.id)
            .where(
                DistrictExit.id.in_(dead),
                DistrictExit.status == ExitStatus.RUNNING,
                JournalEntry.restored_at.is_(None),
            )
            .distinct()
            .order_by(DistrictExit.district_id)
        )
    )
