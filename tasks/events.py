"""Routing a stored roster event to the rules (SPEC §4): roster pauses (``tasks.pauses``), the
ordering fence (``tasks.fence``), the brake (``tasks.brake``), and the handler for each event
type. ``process_event`` runs in one transaction with the event row locked, so an event is applied
at most once however often it is delivered or replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from models import (
    Account,
    AccountKind,
    AuditAction,
    Class,
    District,
    DistrictStatus,
    EventStatus,
    JournalEntry,
    JournalKind,
    RosterEvent,
    utcnow,
)
from tasks import brake, changes, conversion, exits, fence, pauses, roster
from tasks.conversion.journal import audit
from tasks.errors import NotFound, RestoreRefused, WaitForRoster
from tasks.inbox import event_object, not_acted_on
from tasks.sql import count
from tasks.storable import explain

log = logging.getLogger("grassroots.events")
# A section naming people whose users.created has not been applied yet is tried again this many
# times before it is applied with the people known.
UNKNOWN_MEMBER_ATTEMPTS = 3


@dataclass
class Routed:
    status: EventStatus  # done | ignored | stale | held | deferred | rejected
    reason: str | None = None
    outcome: dict[str, Any] = field(default_factory=dict)
    exit_plan: exits.ExitPlan | None = None  # a district exit this event started: to dispatch


@dataclass(frozen=True)
class Limits:
    retention_days: int = 30
    brake_percent: float = 10.0


DONE, IGNORED = EventStatus.DONE, EventStatus.IGNORED


def _trigger(ev: RosterEvent) -> str:
    return f"event:{ev.type}:{ev.id}"


def _active_district(session: Session, district_id: Any) -> bool:
    if not isinstance(district_id, str):
        return False
    status = session.scalar(select(District.status).where(District.id == district_id))
    return status == DistrictStatus.ACTIVE


def _no_account(clever_roles: Iterable[str]) -> str:
    """Why an event of a user holding no platform role (a staff member, a contact) is ignored."""
    return f"no platform role ({', '.join(sorted(clever_roles)) or 'none'}): no account"


def _listed(session: Session, obj: dict[str, Any]) -> roster.CleverUser | None:
    """The user as the event lists it, for the mirror, if its district is in the program (None
    otherwise). Read before anything changes: a malformed user is rejected with nothing done."""
    if not _active_district(session, obj.get("district")):
        return None
    return roster.CleverUser.model_validate(obj)


def on_user_deleted(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    user_id = ev.object_id or ""
    account = changes.account_of(session, user_id)
    if account is None:
        gone = roster.delete_roster_users(session, [user_id])
        return Routed(IGNORED, _no_account(gone[user_id]) if user_id in gone else "unknown user")
    if account.kind != AccountKind.DISTRICT or account.district_id is None:
        roster.delete_roster_users(session, [user_id])
        return Routed(IGNORED, "not a district account (already converted)")
    if not ev.brake_released:
        allowed, percent = brake.allows(
            session, account.district_id, default_percent=limits.brake_percent
        )
        if not allowed:
            # The mirror keeps the user until the removal is applied: it is not, yet.
            return Routed(EventStatus.HELD, brake.hold_reason(percent))
    out = conversion.convert_account(session, account.id, trigger=_trigger(ev))
    roster.delete_roster_users(session, [user_id])
    return Routed(DONE, outcome=out.as_dict())


def on_user_updated(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    obj = event_object(ev.payload) or {}
    account = changes.account_of(session, ev.object_id or "")
    if account is None:
        return (
            on_user_created(session, ev, limits)
            if _active_district(session, obj.get("district"))
            else Routed(IGNORED, "unknown user")
        )
    # Without roles the object cannot say who the user now is: the mirror row stays as it was.
    user = _listed(session, obj) if obj.get("roles") else None
    if account.kind != AccountKind.DISTRICT:
        if user is not None:
            roster.upsert_roster_users(session, [user])
        return Routed(IGNORED, "not a district account (already converted)")
    result: dict[str, Any] = {}
    lost = changes.lost_roles(ev, account)
    if lost:
        # An account left with no platform role (a teacher who is now only staff) is converted
        # whole; the mirror keeps the user with the Clever roles that remain.
        result = conversion.lose_roles(session, account.id, lost, trigger=_trigger(ev)).as_dict()
    session.refresh(account)
    if user is not None:
        if account.kind == AccountKind.DISTRICT:
            roster.upsert_users(session, [user])
        else:
            roster.upsert_roster_users(session, [user])
    return Routed(DONE, outcome=result)


def on_user_created(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    obj = event_object(ev.payload) or {}
    account = changes.account_of(session, ev.object_id or "")
    if account is not None and account.kind != AccountKind.DISTRICT:
        return _reappeared(session, ev, account, obj, limits)
    user = _listed(session, obj)
    if user is None:
        return Routed(IGNORED, "district unknown or not in the program")
    roster.upsert_users(session, [user])
    if account is None and not user.holds_platform_role:
        return Routed(IGNORED, _no_account(user.clever_roles))
    return Routed(DONE)


def _reappeared(
    session: Session, ev: RosterEvent, account: Account, obj: dict[str, Any], limits: Limits
) -> Routed:
    """``users.created`` with the Clever id of a converted account: restore it, if it was
    converted within the retention window. The mirror lists the user again either way."""
    user = _listed(session, obj)
    if user is not None:
        roster.upsert_roster_users(session, [user])
    converted = count(
        session,
        JournalEntry,
        JournalEntry.kind == JournalKind.ACCOUNT,
        JournalEntry.account_id == account.id,
        JournalEntry.restored_at.is_(None),
        JournalEntry.created_at >= utcnow() - timedelta(days=limits.retention_days),
    )
    if not converted:
        return Routed(IGNORED, "converted outside the retention window")
    try:
        restored = conversion.restore(
            session, account.id, trigger=_trigger(ev), retention_days=limits.retention_days
        )
    except RestoreRefused as exc:
        return Routed(IGNORED, str(exc))
    return Routed(DONE, outcome=restored.as_dict())


def on_section_deleted(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    try:
        out = conversion.drop_class(session, ev.object_id or "", trigger=_trigger(ev))
    except NotFound:
        return Routed(IGNORED, "unknown section")
    return Routed(DONE, outcome=out.as_dict())


def on_section_changed(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    """``sections.created`` / ``sections.updated``: add what grew, remove what shrank."""
    obj = event_object(ev.payload) or {}
    section = roster.CleverSection.model_validate(obj)
    klass = session.get(Class, section.id)
    if klass is None and not _active_district(session, section.district):
        return Routed(IGNORED, "district unknown or not in the program")
    if klass is not None and (klass.removed_by is not None or not klass.district_synced):
        return Routed(IGNORED, "class already removed")
    members = [*section.all_teachers, *section.students]
    accounts = dict(
        session.execute(select(Account.id, Account.kind).where(Account.id.in_(members)))
        .tuples()
        .all()
    )
    known = {a for a, kind in accounts.items() if kind == AccountKind.DISTRICT}
    unknown = set(members) - set(accounts)
    if unknown and ev.attempts < UNKNOWN_MEMBER_ATTEMPTS:
        # Their users.created may be in flight on another worker: try again shortly. After a few
        # attempts the section is applied with the people we know, and the rest are reported.
        raise WaitForRoster(f"section {section.id} names {len(unknown)} user(s) not known yet")
    result: dict[str, Any] = {"unknown_members": len(unknown)} if unknown else {}
    if klass is not None:
        gone_students, gone_teachers = changes.gone_members(session, ev, section)
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
                return Routed(DONE, outcome=result)
    grown = section.model_copy(
        update={
            "teacher": None,
            "teachers": [t for t in section.all_teachers if t in known],
            "students": [s for s in section.students if s in known],
        }
    )
    if not grown.teachers and klass is None:
        return Routed(IGNORED, "section has no teacher we know")
    roster.upsert_sections(session, [grown])
    return Routed(DONE, outcome=result)


def on_district_deleted(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    if session.get(District, ev.object_id or "") is None:
        return Routed(IGNORED, "unknown district")
    plan = exits.start_exit(session, ev.object_id or "", trigger=_trigger(ev))
    return Routed(DONE, outcome={"exit": plan.exit_id, "units": len(plan.pending)}, exit_plan=plan)


HANDLERS: dict[str, Callable[[Session, RosterEvent, Limits], Routed]] = {
    "users.deleted": on_user_deleted,
    "users.updated": on_user_updated,
    "users.created": on_user_created,
    "sections.deleted": on_section_deleted,
    "sections.updated": on_section_changed,
    "sections.created": on_section_changed,
    "districts.deleted": on_district_deleted,
}


def _route(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    handler = HANDLERS.get(ev.type)
    if handler is None:
        # Stored ignored already (tasks.inbox.ACTED_ON); one from before that rule lands here.
        return Routed(IGNORED, not_acted_on(ev.type))
    newest = fence.lock(session, ev)
    # The pause comes before the fence: a removal processed during a pause is deferred even if a
    # newer event of its object was applied meanwhile. The fence decides when it is released.
    pause = pauses.pausing(session, ev)
    if pause is not None:
        return Routed(EventStatus.DEFERRED, pauses.defer(ev, pause), {"pause": pause.id})
    if newest is not None and fence.is_stale(newest, ev):
        return Routed(EventStatus.STALE, f"older than event {newest.event_id} already applied")
    try:
        routed = handler(session, ev, limits)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(map(str, err["loc"]))
        return Routed(EventStatus.REJECTED, f"{where}: {explain(err)}")
    if newest is not None and routed.status in (DONE, IGNORED):
        fence.advance(session, newest, ev)
    return routed


# What the audit log calls each outcome it records.
AUDITED = {
    DONE: AuditAction.APPLY_EVENT,
    EventStatus.HELD: AuditAction.HOLD,
    EventStatus.DEFERRED: AuditAction.DEFER,
}


def process_event(session: Session, event_id: str, limits: Limits) -> Routed | None:
    """Apply a stored event. None when there is nothing to do (already final, waiting for an
    operator or a pause's end, or gone)."""
    ev = session.scalar(_LOCKED_EVENT, {"event_id": event_id})
    if ev is None or ev.status in EventStatus.final() | EventStatus.waiting():
        return None
    routed = _route(session, ev, limits)
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
    if routed.status in AUDITED:
        record = {
            "action": AUDITED[routed.status],
            "trigger": _trigger(ev),
            "subject_type": ev.object_type or "event",
            "subject_id": (ev.object_id or ev.id)[:64],
            "details": routed.outcome,
        }
        audit(session, [record])
    return routed


# Built once: every event is read through it.
_LOCKED_EVENT = select(RosterEvent).where(RosterEvent.id == bindparam("event_id")).with_for_update()
