"""The brake (SPEC §4): mass removal is the classic disaster of roster sync (an empty export read
as "everyone left"). Roster-absence removals of one district beyond its percentage of its
accounts in a rolling 24 hours are ``held``; an operator releases or discards them. A district's
percentage is its own when an operator set one (``district policy --brake-percent``), else
``REMOVAL_BRAKE_PERCENT``."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import BindParameter, ColumnElement, bindparam, func, select
from sqlalchemy.orm import Session

from models import (
    Account,
    AccountKind,
    AccountStatus,
    AuditAction,
    AuditRecord,
    District,
    EventStatus,
    RosterEvent,
    utcnow,
)
from tasks.errors import NotFound, RestoreRefused
from tasks.sql import count

WINDOW = timedelta(hours=24)
REMOVAL = "users.deleted"  # the roster-absence removal the brake counts and holds


def percent_of(own: float | None, default: float) -> float:
    """A district's brake percentage: its own (``District.brake_percent``) when set, which wins
    over the deployment's ``default`` (REMOVAL_BRAKE_PERCENT)."""
    return default if own is None else own


def allows(session: Session, district_id: str, *, default_percent: float) -> tuple[bool, float]:
    """Whether the brake lets one more roster-absence removal of the district through now, and
    the district's percentage (``percent_of``).

    Far from the allowance, removals of one district run side by side: each holds the
    district's row in share mode to its commit and finds headroom for every removal being
    processed (``headroom``). Near it, a removal waits for the district's row in update mode,
    which it gets once every removal running beside it has ended, and counts exactly
    (``engaged``); none can start meanwhile."""
    now = utcnow()
    district = {"brake_district": district_id}
    shared = session.begin_nested()
    # The lock's read gives the district's own percentage too.
    percent = percent_of(session.scalar(_SHARED, district), default_percent)
    if headroom(session, district_id, percent=percent, now=now):
        shared.commit()  # the share lock stays, to this transaction's end
        return True, percent
    shared.rollback()  # gives the share lock back: taking update mode over it could deadlock
    session.execute(_EXCLUSIVE, district)
    return not engaged(session, district_id, percent=percent, now=now), percent


def would_hold(session: Session, district_id: str, removals: int, *, default_percent: float) -> int:
    """How many of ``removals`` more roster-absence removals of the district the brake would
    hold, at today's allowance (a sync's report says so before they are processed)."""
    if not removals:
        return 0
    own = session.scalar(select(District.brake_percent).where(District.id == district_id))
    percent = percent_of(own, default_percent)
    left = allowance(session, district_id, percent=percent, now=utcnow())
    return max(0, removals - max(left, 0))


def _removed_since(start: datetime | BindParameter[datetime]) -> ColumnElement[bool]:
    """A removal applied since ``start`` (a rolling window's start)."""
    return (RosterEvent.status == EventStatus.DONE) & (RosterEvent.updated_at >= start)


def _removed(session: Session, district_id: str, now: datetime) -> int:
    """Roster-absence removals the district had in the rolling window."""
    return count(
        session,
        RosterEvent,
        RosterEvent.district_id == district_id,
        RosterEvent.type == REMOVAL,
        _removed_since(now - WINDOW),
    )


_ACTIVE = (
    Account.kind == AccountKind.DISTRICT,
    Account.status == AccountStatus.ACTIVE,
)


def _share(accounts: int, percent: float) -> int:
    # In decimal: 7 % of 700 accounts is 49, where binary floating point makes it 49.00000000000001.
    return math.floor(Decimal(accounts) * Decimal(str(percent)) / 100)


def allowance(session: Session, district_id: str, *, percent: float, now: datetime) -> int:
    """How many more roster-absence removals the district may have today: ``percent`` of its
    accounts at the start of the rolling window (active now plus those removed in it), the
    whole ones within it, but at least one a day, so a small district can still lose one person
    a day without an operator, less those already removed in the window."""
    removed = _removed(session, district_id, now)
    active = count(session, Account, Account.district_id == district_id, *_ACTIVE)
    return max(1, _share(active + removed, percent)) - removed


def engaged(session: Session, district_id: str, *, percent: float, now: datetime) -> bool:
    """Would one more roster-absence removal in this district exceed the allowance? The same
    answer as ``allowance(…) < 1``. The caller holds the district's lock."""
    return not _within(session, district_id, percent, _removed(session, district_id, now), 1)


def headroom(session: Session, district_id: str, *, percent: float, now: datetime) -> bool:
    """Whether the allowance covers every removal of the district done in the window and every
    one being processed now (this one among them), whatever becomes of them: then this removal
    needs no district lock to stay within it. Each removal is marked ``processing`` (committed)
    before it asks, so of two asking at once the later one counts the earlier."""
    in_flight, removed = session.execute(
        _IN_FLIGHT_AND_REMOVED, {"brake_district": district_id, "brake_since": now - WINDOW}
    ).one()
    return _within(session, district_id, percent, removed, max(in_flight, 1))


def _within(session: Session, district_id: str, percent: float, removed: int, taking: int) -> bool:
    """Whether ``removed`` removals and ``taking`` more fit the allowance, without counting a
    big district's accounts: it only asks whether the district has the fewest accounts whose
    share covers them, and counting stops there."""
    wanted = removed + taking
    if wanted <= 1:
        return True  # at least one a day
    if percent <= 0:
        return False
    needed = math.ceil(Decimal(100) * wanted / Decimal(str(percent)))
    while _share(needed, percent) < wanted:  # rounding at the edge
        needed += 1
    enough = needed - removed  # of the accounts at the window's start, those active now
    if enough <= 0:
        return True
    found = session.scalar(_ACTIVE_UP_TO, {"brake_district": district_id, "brake_enough": enough})
    return (found or 0) >= enough


# Every removal asks the brake: its statements are built once, with the district, the window's
# start and the count to stop at as parameters.
_DISTRICT = select(District.brake_percent).where(District.id == bindparam("brake_district"))
_SHARED, _EXCLUSIVE = _DISTRICT.with_for_update(read=True), _DISTRICT.with_for_update()
_PROCESSING = RosterEvent.status == EventStatus.PROCESSING
# Both counts in one statement.
_IN_FLIGHT_AND_REMOVED = select(
    func.count().filter(_PROCESSING), func.count().filter(~_PROCESSING)
).where(
    RosterEvent.district_id == bindparam("brake_district"),
    RosterEvent.type == REMOVAL,
    _PROCESSING | _removed_since(bindparam("brake_since")),
)
_ACTIVE_UP_TO = select(func.count()).select_from(
    select(Account.id)
    .where(Account.district_id == bindparam("brake_district"), *_ACTIVE)
    .limit(bindparam("brake_enough"))
    .subquery()
)


def hold_reason(percent: float) -> str:
    return (
        f"removal brake: over {percent:g}% of the district in 24 h; an operator must release or"
        " discard it"
    )


def held_events(session: Session, *, district_id: str | None = None) -> list[RosterEvent]:
    query = (
        select(RosterEvent)
        .where(RosterEvent.status == EventStatus.HELD)
        .order_by(RosterEvent.received_at)
    )
    if district_id:
        query = query.where(RosterEvent.district_id == district_id)
    return list(session.scalars(query))


def _held(session: Session, event_id: str | None, district_id: str | None) -> list[RosterEvent]:
    if event_id is not None:
        ev = session.scalar(select(RosterEvent).where(RosterEvent.id == event_id).with_for_update())
        if ev is None:
            raise NotFound(f"no event {event_id}")
        if ev.status != EventStatus.HELD:
            raise RestoreRefused(f"event {event_id} is {ev.status}, not held")
        return [ev]
    return list(
        session.scalars(
            select(RosterEvent)
            .where(RosterEvent.status == EventStatus.HELD, RosterEvent.district_id == district_id)
            .order_by(RosterEvent.id)
            .with_for_update()
        )
    )


def _settle(
    session: Session, event_id: str | None, district_id: str | None, *, release: bool, by: str
) -> list[str]:
    events = _held(session, event_id, district_id)
    for ev in events:
        if release:
            ev.status, ev.brake_released, ev.error = EventStatus.ACCEPTED, True, None
        else:
            ev.status = EventStatus.DISCARDED
        ev.updated_at = utcnow()
        session.add(
            AuditRecord(
                action=AuditAction.RELEASE if release else AuditAction.DISCARD,
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
    return _settle(session, event_id, district_id, release=True, by=by)


def discard_held(
    session: Session, *, event_id: str | None = None, district_id: str | None = None, by: str
) -> list[str]:
    """Drop held removals for good: the accounts stay as they are."""
    return _settle(session, event_id, district_id, release=False, by=by)
