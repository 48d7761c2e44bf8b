"""Event routing as plain functions: events about different objects that race between workers."""

from __future__ import annotations

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from models import RosterEvent
from tasks import brake, events
from tasks.errors import WaitForRoster
from tasks.inbox import ingest
from tasks.roster import load_snapshot
from tasks.view import account_view
from tests.support.scenario import DISTRICT, LEO, MARIA, RIVERA, S3, STEVE, example, ids

NEWCOMER = "58c81dcea36279271500beef"


def grown_section_event(event_id: str) -> dict[str, object]:
    section = {
        "id": S3,
        "district": DISTRICT,
        "name": "Grade 6",
        "teacher": RIVERA,
        "teachers": [RIVERA],
        "students": [MARIA, NEWCOMER],
    }
    return {
        "id": event_id,
        "type": "sections.updated",
        "created": "2026-10-01T00:00:00Z",
        "data": {"object": section, "previous_attributes": {"students": [MARIA]}},
    }


def attempt(session: Session, event_id: str, n: int) -> None:
    session.execute(update(RosterEvent).where(RosterEvent.id == event_id).values(attempts=n))


def test_section_naming_a_user_not_yet_created_waits_for_that_user(session: Session) -> None:
    load_snapshot(session, example())
    ingest(session, grown_section_event("s-1"), source="webhook")
    attempt(session, "s-1", 1)
    with pytest.raises(WaitForRoster):
        events.process_event(session, "s-1", events.Limits())
    newcomer = {"id": NEWCOMER, "district": DISTRICT, "roles": {"student": {}}}
    ingest(
        session,
        {
            "id": "u-1",
            "type": "users.created",
            "created": "2026-10-01T00:00:00Z",
            "data": {"object": newcomer},
        },
        source="webhook",
    )
    assert events.process_event(session, "u-1", events.Limits()) is not None
    routed = events.process_event(session, "s-1", events.Limits())
    assert routed is not None and routed.status == "done"
    assert ids(account_view(session, NEWCOMER)["classes"]) == [S3]


def test_section_applies_the_people_it_knows_after_a_few_attempts(session: Session) -> None:
    load_snapshot(session, example())
    ingest(session, grown_section_event("s-2"), source="webhook")
    attempt(session, "s-2", events.UNKNOWN_MEMBER_ATTEMPTS)
    routed = events.process_event(session, "s-2", events.Limits())
    assert routed is not None and routed.status == "done"
    assert routed.outcome["unknown_members"] == 1
    assert S3 in ids(account_view(session, MARIA)["classes"])


def test_held_removal_discarded_by_an_operator_leaves_the_account_as_it_was(
    session: Session,
) -> None:
    load_snapshot(session, example())
    limits = events.Limits(brake_percent=10)
    for n, who in enumerate((STEVE, MARIA)):
        obj = {"id": who, "district": DISTRICT, "roles": {"student": {}}}
        ingest(
            session,
            {
                "id": f"d-{n}",
                "type": "users.deleted",
                "created": f"2026-10-01T00:00:0{n}Z",
                "data": {"object": obj},
            },
            source="webhook",
        )
    first = events.process_event(session, "d-0", limits)
    second = events.process_event(session, "d-1", limits)
    assert first is not None and first.status == "done"
    assert second is not None and second.status == "held"
    assert brake.discard_held(session, district_id=DISTRICT, by="test") == ["d-1"]
    assert events.process_event(session, "d-1", limits) is None
    assert account_view(session, MARIA)["kind"] == "district"
    assert brake.held_events(session) == []


def _user_updated(session: Session, event_id: str, obj: dict[str, object], created: str) -> None:
    ingest(
        session,
        {"id": event_id, "type": "users.updated", "created": created, "data": {"object": obj}},
        source="webhook",
    )
    routed = events.process_event(session, event_id, events.Limits())
    assert routed is not None and routed.status == "done"


def test_users_updated_without_previous_attributes_compares_roles_with_those_held(
    session: Session,
) -> None:
    data = example()
    load_snapshot(session, data)
    rivera = next(u for u in data["users"] if u["id"] == RIVERA)
    assert account_view(session, RIVERA)["roles"] == ["admin", "teacher"]

    # No roles in the object: nothing to compare, nothing removed.
    no_roles = {k: v for k, v in rivera.items() if k != "roles"}
    _user_updated(session, "u-roles-0", no_roles, "2026-10-01T00:00:00Z")
    assert account_view(session, RIVERA)["roles"] == ["admin", "teacher"]

    # The same roles again: nothing lost.
    _user_updated(session, "u-roles-1", rivera, "2026-10-01T00:00:01Z")
    view = account_view(session, RIVERA)
    assert view["roles"] == ["admin", "teacher"] and view["district_reports"] == "allowed"

    # district_admin gone from the roster's roles: the admin rule applies, teaching stays.
    teacher_only = {**rivera, "roles": {"teacher": rivera["roles"]["teacher"]}}
    _user_updated(session, "u-roles-2", teacher_only, "2026-10-01T00:00:02Z")
    view = account_view(session, RIVERA)
    assert view["roles"] == ["teacher"] and view["district_reports"] == "denied"
    assert view["kind"] == "district" and S3 in ids(view["classes"])


@pytest.mark.parametrize(("percent", "passed"), [(40, 2), (10, 1), (0.1, 1), (50, 3)])
def test_brake_lets_through_the_removals_within_the_percentage_and_always_one(
    session: Session, percent: float, passed: int
) -> None:
    # Six district accounts: 40 % is 2.4 of them (two pass, a third would exceed it), 50 % is
    # three; 10 % and 0.1 % are less than one, and one a day always passes.
    load_snapshot(session, example())
    limits = events.Limits(brake_percent=percent)
    statuses = []
    for n, who in enumerate((STEVE, MARIA, LEO)):
        obj = {"id": who, "district": DISTRICT, "roles": {"student": {}}}
        event = {
            "id": f"b-{n}",
            "type": "users.deleted",
            "created": f"2026-10-01T00:00:0{n}Z",
            "data": {"object": obj},
        }
        ingest(session, event, source="webhook")
        routed = events.process_event(session, f"b-{n}", limits)
        assert routed is not None
        statuses.append(routed.status)
    assert statuses == ["done"] * passed + ["held"] * (3 - passed)
