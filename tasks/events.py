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
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import (
    Account,
    AccountKind,
    AuditRecord,
    Class,
    ClassTeacher,
    District,
    DistrictStatus,
    Enrollment,
    EventStatus,
    JournalEntry,
    JournalKind,
    Pause,
    Role,
    RosterEvent,
    utcnow,
)
from tasks import brake, conversion, exits, fence, pauses, roster
from tasks.errors import NotFound, RestoreRefused, WaitForRoster
from tasks.inbox import event_object, not_acted_on, previous_attributes
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
    exit_id: int | None = None  # a district exit this event started: its units are dispatched


@dataclass(frozen=True)
class Limits:
    retention_days: int = 30
    brake_percent: float = 10.0


DONE, IGNORED = EventStatus.DONE, EventStatus.IGNORED


def _trigger(ev: RosterEvent) -> str:
    return f"event:{ev.type}:{ev.id}"


def _account(session: Session, object_id: str) -> Account | None:
    return session.scalar(select(Account).where(Account.clever_id == object_id))


def _roles(obj: Any) -> set[Role]:
    """The platform roles a Clever ``roles`` object holds."""
    if not isinstance(obj, dict):
        return set()
    return {roster.CLEVER_ROLES[r] for r in obj if r in roster.CLEVER_ROLES}


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
    account = _account(session, user_id)
    if account is None:
        gone = roster.delete_roster_users(session, [user_id])
        return Routed(IGNORED, _no_account(gone[user_id]) if user_id in gone else "unknown user")
    if account.kind != AccountKind.DISTRICT or account.district_id is None:
        roster.delete_roster_users(session, [user_id])
        return Routed(IGNORED, "not a district account (already converted)")
    if not ev.brake_released:
        allowed, percent = _brake_allows(session, account.district_id, limits)
        if not allowed:
            # The mirror keeps the user until the removal is applied: it is not, yet.
            return Routed(EventStatus.HELD, brake.hold_reason(percent))
    out = conversion.convert_account(session, account.id, trigger=_trigger(ev))
    roster.delete_roster_users(session, [user_id])
    return Routed(DONE, outcome=out.as_dict())


def _brake_allows(session: Session, district_id: str, limits: Limits) -> tuple[bool, float]:
    """Whether the brake lets this removal through, and the district's percentage (its own, or
    ``limits.brake_percent``).

    Far from the allowance, removals of one district run side by side: each holds the
    district's row in share mode to its commit and finds headroom for every removal being
    processed (``brake.headroom``). Near it, a removal waits for the district's row in update
    mode, which it gets once every removal running beside it has ended, and counts exactly
    (``brake.engaged``); none can start meanwhile."""
    now = utcnow()
    # The lock's read gives the district's own percentage too.
    district = select(District.brake_percent).where(District.id == district_id)
    shared = session.begin_nested()
    percent = brake.percent_of(
        session.scalar(district.with_for_update(read=True)), limits.brake_percent
    )
    if brake.headroom(session, district_id, percent=percent, now=now):
        shared.commit()  # the share lock stays, to this transaction's end
        return True, percent
    shared.rollback()  # gives the share lock back: taking update mode over it could deadlock
    session.execute(district.with_for_update())
    return not brake.engaged(session, district_id, percent=percent, now=now), percent


def on_user_updated(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    obj = event_object(ev.payload) or {}
    account = _account(session, ev.object_id or "")
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
    lost = _lost_roles(ev, account)
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


def _lost_roles(ev: RosterEvent, account: Account) -> set[Role]:
    """The platform roles a ``users.updated`` takes away."""
    obj = event_object(ev.payload) or {}
    prev = previous_attributes(ev.payload)
    if "roles" in prev:
        return _roles(prev["roles"]) - _roles(obj.get("roles"))
    if "roles" in obj:
        # Sent without what changed: the roles the roster now lists, against the ones we hold.
        return set(account.roles) - _roles(obj["roles"])
    return set()


def on_user_created(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    obj = event_object(ev.payload) or {}
    account = _account(session, ev.object_id or "")
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


def _live(session: Session, link: Any, who: Any, class_id: str) -> set[str]:
    return set(
        session.scalars(select(who).where(link.class_id == class_id, link.removed_by.is_(None)))
    )


def _gone(
    session: Session, ev: RosterEvent, section: roster.CleverSection
) -> tuple[set[str], set[str]]:
    """The students and the teachers a section event no longer lists, of those it listed before
    or the class has now."""
    obj = event_object(ev.payload) or {}
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
    return gone_students, gone_teachers


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
        gone_students, gone_teachers = _gone(session, ev, section)
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
    return Routed(
        DONE, outcome={"exit": plan.exit_id, "units": len(plan.pending)}, exit_id=plan.exit_id
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


# What a roster pause defers (SPEC §4 "Pauses"): per event type, whether this event would remove
# something. Additions and field updates are not here, nor are exits (``districts.deleted``) and
# restores (``users.created``): they are never paused. A ``users.updated`` that loses a role, or a
# section event that both grows and shrinks, is deferred whole: an event applies as one Clever
# state, through the fence, or not at all.


def _removes_account(session: Session, ev: RosterEvent) -> bool:
    account = _account(session, ev.object_id or "")
    return (
        account is not None
        and account.kind == AccountKind.DISTRICT
        and account.district_id is not None
    )


def _loses_role(session: Session, ev: RosterEvent) -> bool:
    account = _account(session, ev.object_id or "")
    if account is None or account.kind != AccountKind.DISTRICT:
        return False
    return bool(_lost_roles(ev, account) & set(account.roles))


def _live_class(session: Session, class_id: str) -> Class | None:
    klass = session.get(Class, class_id)
    live = klass is not None and klass.district_synced and klass.removed_by is None
    return klass if live else None


def _removes_class(session: Session, ev: RosterEvent) -> bool:
    return _live_class(session, ev.object_id or "") is not None


def _shrinks_section(session: Session, ev: RosterEvent) -> bool:
    try:
        section = roster.CleverSection.model_validate(event_object(ev.payload) or {})
    except ValidationError:
        return False  # its handler rejects it
    if _live_class(session, section.id) is None:
        return False
    students, teachers = _gone(session, ev, section)
    return bool(students or teachers)


REMOVALS: dict[str, Callable[[Session, RosterEvent], bool]] = {
    "users.deleted": _removes_account,
    "users.updated": _loses_role,
    "sections.deleted": _removes_class,
    "sections.updated": _shrinks_section,
    "sections.created": _shrinks_section,
}


def _district_of(session: Session, ev: RosterEvent) -> str | None:
    """The event's district: as its object names it, or as the mirror holds the object."""
    if ev.district_id is not None or ev.object_id is None:
        return ev.district_id
    if ev.object_type == "user":
        return session.scalar(select(Account.district_id).where(Account.clever_id == ev.object_id))
    if ev.object_type == "section":
        return session.scalar(select(Class.district_id).where(Class.id == ev.object_id))
    return None


def _pausing(session: Session, ev: RosterEvent) -> Pause | None:
    """The pause that defers this event: one covers its district now, and it would remove
    something."""
    removes = REMOVALS.get(ev.type)
    if removes is None or ev.brake_released:
        # An operator's release of a held removal is the operator's word: never paused.
        return None
    pause = pauses.covering(session, _district_of(session, ev), utcnow())
    if pause is None or not removes(session, ev):
        return None
    return pause


def _route(session: Session, ev: RosterEvent, limits: Limits) -> Routed:
    handler = HANDLERS.get(ev.type)
    if handler is None:
        # Stored ignored already (tasks.inbox.ACTED_ON); one from before that rule lands here.
        return Routed(IGNORED, not_acted_on(ev.type))
    newest = fence.lock(session, ev)
    # The pause comes before the fence: a removal processed during a pause is deferred even if a
    # newer event of its object was applied meanwhile. The fence decides when it is released.
    pause = _pausing(session, ev)
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
        fence.advance(newest, ev)
    return routed


# What the audit log calls each outcome it records.
AUDITED = {DONE: "apply_event", EventStatus.HELD: "hold", EventStatus.DEFERRED: "defer"}


def process_event(session: Session, event_id: str, limits: Limits) -> Routed | None:
    """Apply a stored event. None when there is nothing to do (already final, waiting for an
    operator or a pause's end, or gone)."""
    ev = session.scalar(select(RosterEvent).where(RosterEvent.id == event_id).with_for_update())
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
        session.add(
            AuditRecord(
                action=AUDITED[routed.status],
                trigger=_trigger(ev),
                subject_type=ev.object_type or "event",
                subject_id=(ev.object_id or ev.id)[:64],
                details=routed.outcome,
            )
        )
    return routed
