"""Routing a stored roster event to the rules (SPEC §4): the ordering fence, the brake, and the
handler for each event type. ``process_event`` runs in one transaction with the event row locked,
so an event is applied at most once however often it is delivered or replayed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models import (
    FINAL_STATUSES,
    Account,
    AuditRecord,
    Class,
    ClassTeacher,
    DeadLetter,
    District,
    Enrollment,
    JournalEntry,
    ObjectVersion,
    RosterEvent,
    utcnow,
)
from tasks import conversion, exits, roster
from tasks.errors import NotFound, RestoreRefused, WaitForRoster
from tasks.inbox import event_object, previous_attributes
from tasks.sql import dialect_insert

log = logging.getLogger("grassroots.events")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BRAKE_WINDOW = timedelta(hours=24)
UNKNOWN_MEMBER_ATTEMPTS = 3


@dataclass
class Routed:
    status: str  # done | ignored | stale | held
    reason: str | None = None
    outcome: dict[str, Any] = field(default_factory=dict)
    exit_id: int | None = None  # a district exit this event started: its units are dispatched


@dataclass(frozen=True)
class Limits:
    retention_days: int = 30
    brake_percent: float = 10.0


# --------------------------------------------------------------------------------------------
# Ordering fence


def _fence(session: Session, ev: RosterEvent) -> ObjectVersion | None:
    """Lock the object's fence row (creating it first), or None if the event has no object."""
    if ev.object_type is None or ev.object_id is None:
        return None
    session.execute(
        dialect_insert(session, ObjectVersion)
        .values(object_type=ev.object_type, object_id=ev.object_id, occurred_at=EPOCH, event_id="")
        .on_conflict_do_nothing()
    )
    return session.scalar(
        select(ObjectVersion)
        .where(ObjectVersion.object_type == ev.object_type, ObjectVersion.object_id == ev.object_id)
        .with_for_update()
    )


def _is_stale(fence: ObjectVersion, ev: RosterEvent) -> bool:
    assert ev.occurred_at is not None
    return (ev.occurred_at, ev.id) < (fence.occurred_at, fence.event_id)


# --------------------------------------------------------------------------------------------
# Brake


def brake_engaged(session: Session, district_id: str, *, percent: float, now: datetime) -> bool:
    """Would one more roster-absence conversion in this district exceed the allowance?

    The allowance is ``percent`` of the district's accounts at the start of the rolling window
    (active now plus those already removed in it): the removals that do not exceed it, so the
    whole accounts within it, but at least one, so a small district can still lose one person a
    day without an operator.
    """
    since = now - BRAKE_WINDOW
    removed = (
        session.scalar(
            select(func.count())
            .select_from(RosterEvent)
            .where(
                RosterEvent.district_id == district_id,
                RosterEvent.type == "users.deleted",
                RosterEvent.status == "done",
                RosterEvent.updated_at >= since,
            )
        )
        or 0
    )
    active = (
        session.scalar(
            select(func.count())
            .select_from(Account)
            .where(
                Account.district_id == district_id,
                Account.kind == "district",
                Account.status == "active",
            )
        )
        or 0
    )
    # In decimal: 7 % of 700 accounts is 49, where binary floating point makes it 49.00000000000001.
    share = Decimal(active + removed) * Decimal(str(percent)) / 100
    allowance = max(1, math.floor(share))
    return removed + 1 > allowance


# --------------------------------------------------------------------------------------------
# Handlers


def _trigger(ev: RosterEvent) -> str:
    return f"event:{ev.type}:{ev.id}"


def _account(session: Session, object_id: str) -> Account | None:
    return session.scalar(select(Account).where(Account.clever_id == object_id))


def _roles(obj: Any) -> set[str]:
    if not isinstance(obj, dict):
        return set()
    return {roster.CLEVER_ROLES[r] for r in obj if r in roster.CLEVER_ROLES}


def _held_roles(account: Account) -> set[str]:
    flags = {
        "admin": account.is_admin,
        "teacher": account.is_teacher,
        "student": account.is_student,
    }
    return {role for role, has in flags.items() if has}


def _active_district(session: Session, district_id: Any) -> bool:
    if not isinstance(district_id, str):
        return False
    return session.scalar(select(District.status).where(District.id == district_id)) == "active"


def on_user_deleted(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    account = _account(session, ev.object_id or "")
    if account is None:
        return Routed("ignored", "unknown user")
    if account.kind != "district" or account.district_id is None:
        return Routed("ignored", "not a district account (already converted)")
    # Serialise removals per district so concurrent deletions cannot all slip under the brake.
    session.execute(select(District.id).where(District.id == account.district_id).with_for_update())
    if not ev.brake_released and brake_engaged(
        session, account.district_id, percent=limits.brake_percent, now=utcnow()
    ):
        return Routed(
            "held",
            f"removal brake: over {limits.brake_percent:g}% of the district "
            "in 24 h; an operator must release or discard it",
        )
    out = conversion.convert_account(session, account.id, trigger=_trigger(ev))
    return Routed("done", outcome=out.as_dict())


def on_user_updated(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    obj = event_object(ev.payload) or {}
    account = _account(session, ev.object_id or "")
    if account is None:
        return (
            on_user_created(session, ev, limits)
            if _active_district(session, obj.get("district"))
            else Routed("ignored", "unknown user")
        )
    if account.kind != "district":
        return Routed("ignored", "not a district account (already converted)")
    prev = previous_attributes(ev.payload)
    result: dict[str, Any] = {}
    lost: set[str] = set()
    if "roles" in prev:
        lost = _roles(prev["roles"]) - _roles(obj.get("roles"))
    elif "roles" in obj:
        # Sent without what changed: the roles the roster now lists, against the ones we hold.
        lost = _held_roles(account) - _roles(obj["roles"])
    if lost:
        result = conversion.lose_roles(session, account.id, lost, trigger=_trigger(ev)).as_dict()
    session.refresh(account)
    if account.kind == "district" and obj.get("roles"):
        _mirror_user(session, obj)
    return Routed("done", outcome=result)


def _mirror_user(session: Session, obj: dict[str, Any]) -> None:
    user = roster.CleverUser.model_validate(obj)
    roster.upsert_users(session, [user])


def on_user_created(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    obj = event_object(ev.payload) or {}
    account = _account(session, ev.object_id or "")
    if account is not None and account.kind != "district":
        converted = session.scalar(
            select(func.count())
            .select_from(JournalEntry)
            .where(
                JournalEntry.kind == "account",
                JournalEntry.account_id == account.id,
                JournalEntry.restored_at.is_(None),
                JournalEntry.created_at >= utcnow() - timedelta(days=limits.retention_days),
            )
        )
        if not converted:
            return Routed("ignored", "converted outside the retention window")
        try:
            restored = conversion.restore(
                session, account.id, trigger=_trigger(ev), retention_days=limits.retention_days
            )
        except RestoreRefused as exc:
            return Routed("ignored", str(exc))
        return Routed("done", outcome=restored.as_dict())
    if not _active_district(session, obj.get("district")):
        return Routed("ignored", "district unknown or not in the program")
    _mirror_user(session, obj)
    return Routed("done")


def on_section_deleted(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    try:
        out = conversion.drop_class(session, ev.object_id or "", trigger=_trigger(ev))
    except NotFound:
        return Routed("ignored", "unknown section")
    return Routed("done", outcome=out.as_dict())


def _live(session: Session, link: Any, who: Any, class_id: str) -> set[str]:
    return set(
        session.scalars(select(who).where(link.class_id == class_id, link.removed_by.is_(None)))
    )


def on_section_changed(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    """``sections.created`` / ``sections.updated``: add what grew, remove what shrank."""
    obj = event_object(ev.payload) or {}
    section = roster.CleverSection.model_validate(obj)
    klass = session.get(Class, section.id)
    if klass is None and not _active_district(session, section.district):
        return Routed("ignored", "district unknown or not in the program")
    if klass is not None and (klass.removed_by is not None or not klass.district_synced):
        return Routed("ignored", "class already removed")
    members = [*section.all_teachers, *section.students]
    accounts = dict(
        session.execute(select(Account.id, Account.kind).where(Account.id.in_(members)))
        .tuples()
        .all()
    )
    known = {a for a, kind in accounts.items() if kind == "district"}
    unknown = set(members) - set(accounts)
    if unknown and ev.attempts < UNKNOWN_MEMBER_ATTEMPTS:
        # Their users.created may be in flight on another worker: try again shortly. After a few
        # attempts the section is applied with the people we know, and the rest are reported.
        raise WaitForRoster(f"section {section.id} names {len(unknown)} user(s) not known yet")
    result: dict[str, Any] = {"unknown_members": len(unknown)} if unknown else {}
    if klass is not None:
        prev = previous_attributes(ev.payload)
        gone_students: set[str] = set()
        gone_teachers: set[str] = set()
        if "students" in obj:
            before = set(prev.get("students") or []) | _live(
                session, Enrollment, Enrollment.student_id, section.id
            )
            gone_students = before - set(section.students)
        if "teachers" in obj or "teacher" in obj:
            before = set(prev.get("teachers") or []) | _live(
                session, ClassTeacher, ClassTeacher.teacher_id, section.id
            )
            gone_teachers = before - set(section.all_teachers)
        if gone_students or gone_teachers:
            shrunk = conversion.shrink_section(
                session,
                section.id,
                students=sorted(gone_students),
                teachers=sorted(gone_teachers),
                trigger=_trigger(ev),
            )
            result.update(shrunk.as_dict())
            session.refresh(klass)
            if klass.removed_by is not None:
                return Routed("done", outcome=result)
    grown = section.model_copy(
        update={
            "teacher": None,
            "teachers": [t for t in section.all_teachers if t in known],
            "students": [s for s in section.students if s in known],
        }
    )
    if not grown.teachers and klass is None:
        return Routed("ignored", "section has no teacher we know")
    roster.upsert_sections(session, [grown])
    return Routed("done", outcome=result)


def on_district_deleted(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    if session.get(District, ev.object_id or "") is None:
        return Routed("ignored", "unknown district")
    plan = exits.start_exit(session, ev.object_id or "", trigger=_trigger(ev))
    return Routed(
        "done", outcome={"exit": plan.exit_id, "units": len(plan.pending)}, exit_id=plan.exit_id
    )


HANDLERS: dict[str, Callable[[Session, RosterEvent, Limits], Routed]] = {
    "users.deleted": on_user_deleted,
    "users.updated": on_user_updated,
    "users.created": on_user_created,
    "sections.deleted": on_section_deleted,
    "sections.updated": on_section_changed,
    "sections.created": on_section_changed,
    "districts.deleted": on_district_deleted,
}


# --------------------------------------------------------------------------------------------
# Entry point


def process_event(session: Session, event_id: str, limits: Limits) -> Routed | None:
    """Apply a stored event. None when there is nothing to do (already final, held, or gone)."""
    ev = session.scalar(select(RosterEvent).where(RosterEvent.id == event_id).with_for_update())
    if ev is None or ev.status in FINAL_STATUSES or ev.status in ("held", "dead"):
        return None
    handler = HANDLERS.get(ev.type)
    if handler is None:
        routed = Routed("ignored", f"event type {ev.type} does not concern conversions")
    else:
        fence = _fence(session, ev)
        if fence is not None and _is_stale(fence, ev):
            routed = Routed("stale", f"older than event {fence.event_id} already applied")
        else:
            try:
                routed = handler(session, ev, limits)
            except ValidationError as exc:
                err = exc.errors()[0]
                routed = Routed("rejected", f"{'.'.join(map(str, err['loc']))}: {err['msg']}")
            if fence is not None and routed.status in ("done", "ignored"):
                assert ev.occurred_at is not None
                fence.occurred_at, fence.event_id = ev.occurred_at, ev.id
    ev.status = routed.status
    ev.error = routed.reason
    ev.updated_at = utcnow()
    log.info(
        "event %s",
        routed.status,
        extra={
            "event_id": ev.id,
            "event_type": ev.type,
            "district_id": ev.district_id,
            ("account_id" if ev.object_type == "user" else "object_id"): ev.object_id,
            "reason": routed.reason,
            **routed.outcome,
        },
    )
    if routed.status in ("done", "held"):
        session.add(
            AuditRecord(
                action="hold" if routed.status == "held" else "apply_event",
                trigger=_trigger(ev),
                subject_type=ev.object_type or "event",
                subject_id=(ev.object_id or ev.id)[:64],
                details=routed.outcome,
            )
        )
    return routed


# --------------------------------------------------------------------------------------------
# Operator actions on held events


def held_events(session: Session, *, district_id: str | None = None) -> list[RosterEvent]:
    query = (
        select(RosterEvent).where(RosterEvent.status == "held").order_by(RosterEvent.received_at)
    )
    if district_id:
        query = query.where(RosterEvent.district_id == district_id)
    return list(session.scalars(query))


def _held(session: Session, event_id: str | None, district_id: str | None) -> list[RosterEvent]:
    if event_id is not None:
        ev = session.scalar(select(RosterEvent).where(RosterEvent.id == event_id).with_for_update())
        if ev is None:
            raise NotFound(f"no event {event_id}")
        if ev.status != "held":
            raise RestoreRefused(f"event {event_id} is {ev.status}, not held")
        return [ev]
    return list(
        session.scalars(
            select(RosterEvent)
            .where(RosterEvent.status == "held", RosterEvent.district_id == district_id)
            .order_by(RosterEvent.id)
            .with_for_update()
        )
    )


def _settle_held(
    session: Session, event_id: str | None, district_id: str | None, *, action: str, by: str
) -> list[str]:
    events = _held(session, event_id, district_id)
    for ev in events:
        if action == "release":
            ev.status, ev.brake_released, ev.error = "accepted", True, None
        else:
            ev.status = "discarded"
        ev.updated_at = utcnow()
        session.add(
            AuditRecord(
                action=action,
                trigger=by,
                subject_type="event",
                subject_id=ev.id[:64],
                details={"district": ev.district_id},
            )
        )
    return [ev.id for ev in events]


def release_held(
    session: Session, *, event_id: str | None = None, district_id: str | None = None, by: str
) -> list[str]:
    """Let held removals through the brake: they go back to ``accepted`` to be processed."""
    return _settle_held(session, event_id, district_id, action="release", by=by)


def discard_held(
    session: Session, *, event_id: str | None = None, district_id: str | None = None, by: str
) -> list[str]:
    """Drop held removals for good: the accounts stay as they are."""
    return _settle_held(session, event_id, district_id, action="discard", by=by)


REPLAYED = "accepted"  # what ``mark_replay`` answers when the event goes round again


def mark_replay(session: Session, event_id: str, *, by: str) -> str:
    """Send a dead event round again by the same id; say what became of the request:
    ``REPLAYED``, or why not: ``already_final`` (replaying an applied event is a no-op),
    ``held`` (the brake's: released with ``held release``), ``in_flight`` (queued or being
    processed already, as after a concurrent replay: a second copy would only count attempts
    against the first; if its worker is lost, the relay sends it again)."""
    # One statement decides, on either backend (SQLite takes no row locks): of replays at once,
    # one finds the event dead. A fresh budget of attempts; the dead letter is closed, and a new
    # failure reopens it with its count raised.
    replayed = session.execute(
        update(RosterEvent)
        .where(RosterEvent.id == event_id, RosterEvent.status == "dead")
        .values(status="accepted", attempts=0, updated_at=utcnow())
        .returning(RosterEvent.id)
    ).first()
    if replayed is None:
        status = session.scalar(select(RosterEvent.status).where(RosterEvent.id == event_id))
        if status is None:
            raise NotFound(f"no event {event_id}")
        if status in FINAL_STATUSES:
            return "already_final"
        return "held" if status == "held" else "in_flight"
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
            details={"was": "dead"},
        )
    )
    return REPLAYED
