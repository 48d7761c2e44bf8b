"""What each page of the console shows (SPEC §5.9), as plain data: one function per page, over a
session. The rules they show live where they always did (``tasks.status``, ``deadletters``,
``brake``, ``pauses``, ``view``, ``exits``, ``roster_syncs``); these only read and shape.

Lists are paged by key, newest first ("older than (received_at, id)"), never by OFFSET.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from models import (
    AuditRecord,
    District,
    DistrictExit,
    EventStatus,
    ExitStatus,
    ExitUnit,
    JournalEntry,
    JournalKind,
    RosterEvent,
    UnitStatus,
)
from tasks import brake, deadletters, exits, operators, pauses, policy, roster_syncs, status, view
from tasks.errors import NotFound

PAGE = 50


def _cursor(at: datetime, key: str | int) -> str:
    return f"{at.isoformat()}|{key}"


def _parse_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor or "|" not in cursor:
        return None
    at, _, key = cursor.partition("|")
    try:
        return datetime.fromisoformat(at), key
    except ValueError:
        return None


def overview(session: Session, *, now: datetime) -> dict[str, Any]:
    """What the Overview adds to the pipeline's status: the age of the oldest pending event and
    the exits running and stalled."""
    oldest = session.scalar(
        select(RosterEvent.received_at)
        .where(RosterEvent.status.in_(list(EventStatus.in_flight())))
        .order_by(RosterEvent.received_at)
        .limit(1)
    )
    running = session.execute(
        select(DistrictExit.id, DistrictExit.district_id)
        .where(DistrictExit.status == ExitStatus.RUNNING)
        .order_by(DistrictExit.id)
    ).all()
    stalled = set(
        session.scalars(
            select(ExitUnit.exit_id)
            .where(
                ExitUnit.exit_id.in_([r.id for r in running]),
                ExitUnit.status == UnitStatus.DEAD,
            )
            .distinct()
        )
    )
    return {
        "oldest_pending_age": None if oldest is None else (now - oldest).total_seconds(),
        "exits_running": [r.district_id for r in running if r.id not in stalled],
        "exits_stalled": [r.district_id for r in running if r.id in stalled],
        "all_districts": [
            {"id": d.id, "name": d.name}
            for d in session.execute(select(District.id, District.name).order_by(District.id))
        ],
    }


def events(
    session: Session,
    *,
    status_: str | None = None,
    type_: str | None = None,
    district: str | None = None,
    before: str | None = None,
    limit: int = PAGE,
) -> dict[str, Any]:
    """A page of the inbox, newest first, and the cursor of the next (older) page."""
    query = select(RosterEvent).order_by(RosterEvent.received_at.desc(), RosterEvent.id.desc())
    if status_:
        query = query.where(RosterEvent.status == status_)
    if type_:
        query = query.where(RosterEvent.type == type_)
    if district:
        query = query.where(RosterEvent.district_id == district)
    after = _parse_cursor(before)
    if after is not None:
        at, key = after
        query = query.where(
            or_(
                RosterEvent.received_at < at,
                and_(RosterEvent.received_at == at, RosterEvent.id < key),
            )
        )
    found = list(session.scalars(query.limit(limit + 1)))
    shown = found[:limit]
    return {
        "rows": [status.event_row(ev) for ev in shown],
        "next": _cursor(shown[-1].received_at, shown[-1].id) if len(found) > limit else None,
        "statuses": [str(s) for s in EventStatus],
    }


def event(session: Session, event_id: str) -> dict[str, Any]:
    found = status.event_detail(session, event_id)
    if found is None:
        raise NotFound(f"no event {event_id}")
    # The event as Clever sent it (retention's purge empties a final event's payload).
    payload = session.scalar(select(RosterEvent.payload).where(RosterEvent.id == event_id))
    return {**found, "payload": payload, "replayable": found["status"] == EventStatus.DEAD}


def dead_letters(session: Session) -> dict[str, Any]:
    return {"groups": deadletters.groups(session)}


def dead_letter_group(session: Session, *, task: str, error: str) -> dict[str, Any]:
    """A group as its confirmation shows it: the events Replay all would send now, and the
    highest dead letter id they go up to (the form carries it)."""
    group = next(
        (g for g in deadletters.groups(session) if (g["task"], g["error"]) == (task, error)),
        None,
    )
    if group is None:
        raise NotFound("no open dead letters in that group")
    ids = deadletters.group_events(session, task=task, error=error, up_to=group["up_to"])
    return {**group, "event_ids": ids}


def held(session: Session) -> dict[str, Any]:
    """Removals held by the brake, by district."""
    by_district: dict[str, list[dict[str, Any]]] = {}
    for ev in brake.held_events(session):
        by_district.setdefault(ev.district_id or "", []).append(status.event_row(ev))
    return {
        "districts": [
            {"district": d, "count": len(rows), "events": rows}
            for d, rows in sorted(by_district.items())
        ]
    }


def held_in(session: Session, district_id: str) -> dict[str, Any]:
    """One district's held removals, as a confirmation names them."""
    rows = [status.event_row(ev) for ev in brake.held_events(session, district_id=district_id)]
    return {"district": district_id, "count": len(rows), "events": rows}


def pause_list(session: Session, *, now: datetime) -> dict[str, Any]:
    return {
        "pauses": pauses.listed(session, now=now),
        "districts": list(session.scalars(select(District.id).order_by(District.id))),
    }


def district(session: Session, district_id: str) -> dict[str, Any]:
    """A district: its policy, last sync, what an exit would change, and its exit's progress."""
    row = session.get(District, district_id)
    if row is None:
        raise NotFound(f"no district {district_id}")
    preview = view.preview_exit(session, district_id)
    preview.pop("per_account")
    progress = exits.progress(session, district_id)
    shown = progress.as_dict() if progress is not None else None
    return {
        "id": row.id,
        "name": row.name,
        "status": row.status,
        "policy": policy.policy_of(row),
        "last_sync": roster_syncs.latest(session, district_id),
        "preview": preview,
        "exit": shown,
        "stalled": shown is not None and shown["status"] == exits.STALLED,
        "can_start_exit": row.status != "exited"
        and (shown is None or shown["status"] != "running"),
    }


def account(session: Session, ref: str, *, retention_days: int, now: datetime) -> dict[str, Any]:
    """The account view of SPEC §5.4, and whether a conversion of it is within retention."""
    shown = view.account_view(session, ref)
    acct = view.find_account(session, ref)
    restorable = session.scalar(
        select(func.count())
        .select_from(JournalEntry)
        .where(
            JournalEntry.kind == JournalKind.ACCOUNT,
            JournalEntry.account_id == acct.id,
            JournalEntry.restored_at.is_(None),
            JournalEntry.created_at >= now - timedelta(days=retention_days),
        )
    )
    return {"view": shown, "restorable": bool(restorable)}


def audit(session: Session, *, before: int | None = None, limit: int = PAGE) -> dict[str, Any]:
    """The audit log, newest first: who did what, when, to what."""
    query = select(AuditRecord).order_by(AuditRecord.id.desc())
    if before is not None:
        query = query.where(AuditRecord.id < before)
    found = list(session.scalars(query.limit(limit + 1)))
    shown = found[:limit]
    return {
        "rows": [
            {
                "id": r.id,
                "at": r.at.isoformat(),
                "who": operators.who(r.trigger),
                "action": r.action,
                "trigger": r.trigger,
                "subject": f"{r.subject_type} {r.subject_id}",
            }
            for r in shown
        ],
        "next": shown[-1].id if len(found) > limit else None,
    }
