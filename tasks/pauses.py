"""Roster pauses (SPEC §4 "Pauses"): districts' requirements on when roster changes take effect.

The platform pauses rostering over holidays (and may over the summer): a pause covers every
district or one, from a start to an end instant (UTC). While one covers a district, the
destructive roster changes processed for it — which ones, ``REMOVALS`` says per event type —
are recorded ``deferred`` with the pause named in the reason, and change nothing. What decides
is when a change is processed, not its Clever ``created``. When the pause ends, or is removed
early, ``release_due`` puts its deferred events back in the inbox, to be sent in Clever order
(``created``, then event id) through the ordering fence and the brake like any event; one that
another pause covers by then is deferred again, by that pause, when a worker takes it.

Here: the covering check, what a pause defers (``pausing``), deferring, what a pause's end
releases, and an operator's add, list, remove and discard, with their validation. Nothing here
is paused itself: exits, restores and operator actions never are.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, func, insert, or_, select, update
from sqlalchemy.orm import Session

from models import (
    Account,
    AccountKind,
    AuditAction,
    AuditRecord,
    Class,
    District,
    EventStatus,
    Pause,
    RosterEvent,
    utcnow,
)
from models.pause import REASON_LENGTH
from tasks import brake, changes, roster
from tasks.errors import InvalidInput, NotFound, Refused
from tasks.inbox import event_object
from tasks.storable import unstorable

DEFERRED = EventStatus.DEFERRED


def parse_instant(text: str, *, what: str) -> datetime:
    """An ISO 8601 instant, in UTC: a date means its midnight UTC, a time without an offset is
    UTC. ``what`` names the value in the error (``--until``, ``'until'``)."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(
            f"{what} {text!r} is not an ISO 8601 date or time (e.g. 2026-12-21 or"
            " 2026-12-21T08:00:00Z)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


# --------------------------------------------------------------------------------------------
# The rule


def covering(session: Session, district_id: str | None, now: datetime) -> Pause | None:
    """The pause that covers the district now, if any: of several, the one that ends last."""
    if district_id is None:
        return session.scalar(_COVERING_ALL, {"now": now})
    return session.scalar(_COVERING_ONE, {"now": now, "district": district_id})


# Built once: every removal asks.
_COVERING = (
    select(Pause)
    .where(
        Pause.removed_at.is_(None),
        Pause.starts_at <= bindparam("now", type_=Pause.starts_at.type),
        Pause.ends_at > bindparam("now", type_=Pause.ends_at.type),
    )
    .order_by(Pause.ends_at.desc(), Pause.id)
    .limit(1)
)
_COVERING_ALL = _COVERING.where(Pause.district_id.is_(None))
_COVERING_ONE = _COVERING.where(
    or_(Pause.district_id.is_(None), Pause.district_id == bindparam("district"))
)


def defer(ev: RosterEvent, pause: Pause) -> str:
    """Tie the event to the pause that defers it (its end releases it); the reason to record."""
    ev.pause_id = pause.id
    scope = "every district" if pause.district_id is None else f"district {pause.district_id}"
    why = f": {pause.reason}" if pause.reason else ""
    return (
        f"deferred by pause {pause.id} ({scope}, until {_iso(pause.ends_at)}{why}); applied"
        " when the pause ends"
    )


# What a roster pause defers (SPEC §4 "Pauses"): per event type, whether this event would remove
# something. Additions and field updates are not here, nor are exits (``districts.deleted``) and
# restores (``users.created``): they are never paused. A ``users.updated`` that loses a role, or a
# section event that both grows and shrinks, is deferred whole: an event applies as one Clever
# state, through the fence, or not at all.


def _removes_account(session: Session, ev: RosterEvent) -> bool:
    account = changes.account_of(session, ev.object_id or "")
    return (
        account is not None
        and account.kind == AccountKind.DISTRICT
        and account.district_id is not None
    )


def _loses_role(session: Session, ev: RosterEvent) -> bool:
    account = changes.account_of(session, ev.object_id or "")
    if account is None or account.kind != AccountKind.DISTRICT:
        return False
    return bool(changes.lost_roles(ev, account) & set(account.roles))


def _removes_class(session: Session, ev: RosterEvent) -> bool:
    return changes.live_class(session, ev.object_id or "") is not None


def _shrinks_section(session: Session, ev: RosterEvent) -> bool:
    try:
        section = roster.CleverSection.model_validate(event_object(ev.payload) or {})
    except ValidationError:
        return False  # its handler rejects it
    if changes.live_class(session, section.id) is None:
        return False
    students, teachers = changes.gone_members(session, ev, section)
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


def pausing(session: Session, ev: RosterEvent) -> Pause | None:
    """The pause that defers this event: one covers its district now, and it would remove
    something."""
    removes = REMOVALS.get(ev.type)
    if removes is None or ev.brake_released:
        # An operator's release of a held removal is the operator's word: never paused.
        return None
    pause = covering(session, _district_of(session, ev), utcnow())
    if pause is None or not removes(session, ev):
        return None
    return pause


def release_due(session: Session, *, now: datetime) -> list[str]:
    """Put back in the inbox the deferred events of every pause that has ended or was removed,
    and return their ids in Clever order (``created``, then id): the order to send them in.

    One UPDATE decides: of two releases at once (beat's and an operator's ``pause remove``),
    each event is released, and so sent, by one of them only."""
    over = select(Pause.id).where(or_(Pause.removed_at.is_not(None), Pause.ends_at <= now))
    released = session.execute(
        update(RosterEvent)
        .where(
            RosterEvent.status == DEFERRED,
            or_(RosterEvent.pause_id.is_(None), RosterEvent.pause_id.in_(over)),
        )
        # A fresh budget of attempts, as a replay gives: being deferred was no failure.
        .values(status=EventStatus.ACCEPTED, error=None, attempts=0, updated_at=now)
        .returning(RosterEvent.id, RosterEvent.occurred_at, RosterEvent.pause_id)
        .execution_options(synchronize_session=False)
    ).all()
    if not released:
        return []
    session.execute(
        insert(AuditRecord),
        [
            {
                "at": now,
                "action": AuditAction.RELEASE,
                "trigger": f"pause:{pause_id}" if pause_id is not None else "pause",
                "subject_type": "event",
                "subject_id": event_id[:64],
                "details": {"was": DEFERRED, "pause": pause_id},
            }
            for event_id, _, pause_id in released
        ],
    )
    ordered = sorted(released, key=lambda row: (row[1] or now, row[0]))
    return [event_id for event_id, _, _ in ordered]


# --------------------------------------------------------------------------------------------
# An operator's pauses


def add(
    session: Session,
    *,
    district_id: str | None,
    starts_at: datetime | None,
    ends_at: datetime,
    reason: str | None,
    by: str,
    now: datetime,
) -> dict[str, Any]:
    """A new pause of one district (``district_id``) or every one (None), from ``starts_at``
    (None: now) to ``ends_at``; the pause as ``describe`` gives it. ``InvalidInput`` if it
    would end before it starts or is over already, ``NotFound`` for an unknown district: then
    nothing is stored."""
    starts = starts_at or now
    if ends_at <= starts:
        raise InvalidInput(
            f"the pause would end ({_iso(ends_at)}) before it starts ({_iso(starts)}): its end"
            " must come after its start"
        )
    if ends_at <= now:
        raise InvalidInput(f"the pause would be over already: its end ({_iso(ends_at)}) is past")
    reason = (reason or "").strip() or None
    if reason is not None and len(reason) > REASON_LENGTH:
        raise InvalidInput(f"the reason is {len(reason)} characters long; at most {REASON_LENGTH}")
    # From the ops API or the console as much as the shell: checked here, once, for all of them.
    problem = unstorable({"district": district_id, "reason": reason})
    if problem is not None:
        raise InvalidInput(problem)
    if district_id is not None and session.get(District, district_id) is None:
        raise NotFound(f"no district {district_id}")
    pause = Pause(
        district_id=district_id,
        starts_at=starts,
        ends_at=ends_at,
        reason=reason,
        created_by=by[:100],
        created_at=now,
        updated_at=now,
    )
    session.add(pause)
    session.flush()
    _audit(session, AuditAction.PAUSE, pause, by)
    return describe(pause, deferred=0)


def listed(session: Session, *, now: datetime) -> list[dict[str, Any]]:
    """The pauses that matter now, earliest start first: those to come, those running, and
    those ended whose deferred events are not released yet. Removed pauses are gone."""
    held = dict(
        session.execute(
            select(RosterEvent.pause_id, func.count())
            .where(RosterEvent.status == DEFERRED, RosterEvent.pause_id.is_not(None))
            .group_by(RosterEvent.pause_id)
        )
        .tuples()
        .all()
    )
    pauses = session.scalars(
        select(Pause)
        .where(Pause.removed_at.is_(None), or_(Pause.ends_at > now, Pause.id.in_(list(held))))
        .order_by(Pause.starts_at, Pause.id)
    )
    return [describe(p, deferred=held.get(p.id, 0)) for p in pauses]


def remove(session: Session, pause_id: int, *, by: str, now: datetime) -> dict[str, Any]:
    """End a pause early (or drop one to come): it covers nothing from now on, and what it
    deferred is released by the next ``release_due``. The pause as it was."""
    pause = session.get(Pause, pause_id, with_for_update=True)
    if pause is None or pause.removed_at is not None:
        raise NotFound(f"no pause {pause_id}")
    deferred = _deferred_by(session, pause.id)
    pause.removed_at, pause.removed_by, pause.updated_at = now, by[:100], now
    _audit(session, AuditAction.PAUSE_REMOVE, pause, by)
    return describe(pause, deferred=deferred)


def describe(pause: Pause, *, deferred: int) -> dict[str, Any]:
    """SPEC §5.6's ``pause list --json`` item."""
    return {
        "id": pause.id,
        "district": pause.district_id,
        "from": _iso(pause.starts_at),
        "until": _iso(pause.ends_at),
        "reason": pause.reason,
        "deferred": deferred,
    }


def discard(session: Session, event_id: str, *, by: str) -> str:
    """Drop for good an event that waits for an operator's word (``held``) or a pause's end
    (``deferred``): what it would have removed stays. The status it had."""
    ev = session.scalar(select(RosterEvent).where(RosterEvent.id == event_id).with_for_update())
    if ev is None:
        raise NotFound(f"no event {event_id}")
    if ev.status == EventStatus.HELD:
        brake.discard_held(session, event_id=event_id, by=by)
        return EventStatus.HELD
    if ev.status != DEFERRED:
        raise Refused(
            f"event {event_id} is {ev.status}: only a held or a deferred event can be discarded"
        )
    ev.status, ev.updated_at = EventStatus.DISCARDED, utcnow()
    session.add(
        AuditRecord(
            action=AuditAction.DISCARD,
            trigger=by,
            subject_type="event",
            subject_id=ev.id[:64],
            details={"was": DEFERRED, "pause": ev.pause_id, "district": ev.district_id},
        )
    )
    return DEFERRED


def _deferred_by(session: Session, pause_id: int) -> int:
    return (
        session.scalar(
            select(func.count()).where(
                RosterEvent.status == DEFERRED, RosterEvent.pause_id == pause_id
            )
        )
        or 0
    )


def _audit(session: Session, action: AuditAction, pause: Pause, by: str) -> None:
    session.add(
        AuditRecord(
            action=action,
            trigger=by[:200],
            subject_type="pause",
            subject_id=str(pause.id),
            details={
                "district": pause.district_id,
                "from": _iso(pause.starts_at),
                "until": _iso(pause.ends_at),
            },
        )
    )
