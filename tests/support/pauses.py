"""Roster events and pauses as the pause tests (``tests/test_pauses*.py``) make them: a user
event's object, an event ingested and routed as the workers route it, its stored row, and a
pause around now.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from models import RosterEvent, utcnow
from tasks import events, pauses
from tasks.inbox import ingest
from tests.support.scenario import DISTRICT

HOUR = timedelta(hours=1)
# Clever times of changes made before the tests run: a `created` ahead of our clock is rejected.
T1, T2, T3 = "2026-10-20T10:00:00Z", "2026-10-22T10:00:00Z", "2026-11-03T10:00:00Z"
FULL = events.Limits(brake_percent=100)


def user(user_id: str, roles: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": user_id, "district": DISTRICT, "roles": roles, **extra}


def route(
    session: Session,
    event_id: str,
    type_: str,
    obj: dict[str, Any],
    *,
    created: str = T1,
    previous: dict[str, Any] | None = None,
    limits: events.Limits = FULL,
) -> events.Routed:
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    raw = {"id": event_id, "type": type_, "created": created, "data": data}
    ingest(session, raw, source="webhook")
    routed = events.process_event(session, event_id, limits)
    assert routed is not None
    return routed


def stored(session: Session, event_id: str) -> RosterEvent:
    ev = session.get(RosterEvent, event_id, populate_existing=True)
    assert ev is not None
    return ev


def pause(
    session: Session,
    *,
    district: str | None = None,
    starts: timedelta = -HOUR,
    ends: timedelta = HOUR,
    reason: str | None = "winter break",
) -> dict[str, Any]:
    now = utcnow()
    return pauses.add(
        session,
        district_id=district,
        starts_at=now + starts,
        ends_at=now + ends,
        reason=reason,
        by="test",
        now=now,
    )
