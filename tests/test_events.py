"""Event routing as plain functions: events about different objects that race between workers,
and Clever's whole data (SPEC §4): every role kept in the mirror, every other resource ignored."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import (
    Account,
    AccountKind,
    AccountStatus,
    CleverRole,
    EventStatus,
    Role,
    RosterEvent,
    RosterUser,
    utcnow,
)
from tasks import brake, events, inbox
from tasks.errors import NotFound, WaitForRoster
from tasks.inbox import ingest
from tasks.roster import load_snapshot
from tasks.view import account_view
from tests.support.scenario import (
    DISTRICT,
    KIM,
    LEO,
    MARIA,
    PAT,
    RIVERA,
    S1,
    S3,
    STEVE,
    example,
    ids,
)

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


def test_removals_being_processed_count_against_the_brake_until_they_end(
    session: Session,
) -> None:
    # Six accounts at 40 %: two removals pass. One is done, and two are being processed at once
    # (their attempts counted, their work not committed): neither has headroom, as both might
    # land. Once one of them has ended, the other's exact count lets it through.
    load_snapshot(session, example())
    now = utcnow()
    for n, (who, status) in enumerate(
        ((STEVE, "done"), (MARIA, "processing"), (LEO, "processing"))
    ):
        obj = {"id": who, "district": DISTRICT, "roles": {"student": {}}}
        event = {
            "id": f"f-{n}",
            "type": "users.deleted",
            "created": "2026-11-01T00:00:00Z",
            "data": {"object": obj},
        }
        ingest(session, event, source="webhook")
        session.execute(update(RosterEvent).where(RosterEvent.id == f"f-{n}").values(status=status))
    assert not brake.headroom(session, DISTRICT, percent=40, now=now)
    assert brake.headroom(session, DISTRICT, percent=50, now=now)
    assert not brake.engaged(session, DISTRICT, percent=40, now=now)
    assert brake.allowance(session, DISTRICT, percent=40, now=now) == 1


# --------------------------------------------------------------------------------------------
# Clever's whole data (SPEC §4)

COUNSELOR = "5f8e2c1a9b7d4e0012ab0004"  # staff only, in the example district
PARENT = "5f8e2c1a9b7d4e0012ab0005"  # contact only, Steve's parent
NEW_PARENT = "5f8e2c1a9b7d4e0012ab00a1"
SUPERINTENDENT = "5f8e2c1a9b7d4e0012ab00a2"
PARENT_ROLE = {
    "contact": {
        "sis_id": "C-9",
        "phone_type": "Cell",
        "student_relationships": [
            {"student": STEVE, "relationship": "Parent", "type": "Parent/Guardian"}
        ],
    }
}


def mirrored(session: Session) -> dict[str, list[str]]:
    return dict(session.execute(select(RosterUser.id, RosterUser.roles)).tuples().all())


def user(user_id: str, roles: dict[str, Any]) -> dict[str, Any]:
    return {"id": user_id, "district": DISTRICT, "roles": roles}


def route(
    session: Session,
    event_id: str,
    type_: str,
    obj: Any,
    *,
    previous: dict[str, Any] | None = None,
    created: str = "2026-10-01T00:00:00Z",
) -> events.Routed | None:
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    event = {"id": event_id, "type": type_, "created": created, "data": data}
    ingest(session, event, source="webhook")
    return events.process_event(session, event_id, events.Limits())


def stored(session: Session, event_id: str) -> tuple[str, str | None]:
    ev = session.get(RosterEvent, event_id)
    assert ev is not None
    return ev.status, ev.error


def test_every_event_type_we_act_on_has_a_handler_and_no_other() -> None:
    assert set(events.HANDLERS) == inbox.ACTED_ON


@pytest.mark.parametrize(
    ("who", "roles", "reason"),
    [
        (NEW_PARENT, PARENT_ROLE, "no platform role (contact): no account"),
        (NEW_PARENT, {"staff": {"title": "Counselor"}}, "no platform role (staff): no account"),
        (
            NEW_PARENT,
            {"staff": None, "contact": {}, "guardian": {"x": 1}},
            "no platform role (contact, staff): no account",
        ),
    ],
    ids=["contact", "staff", "staff-and-contact-and-a-role-clever-adds-later"],
)
def test_users_created_of_someone_without_a_platform_role_is_mirrored_and_ignored(
    session: Session, who: str, roles: dict[str, Any], reason: str
) -> None:
    load_snapshot(session, example())
    routed = route(session, "c-1", "users.created", user(who, roles))
    assert routed is not None and (routed.status, routed.reason) == (EventStatus.IGNORED, reason)
    assert stored(session, "c-1") == (EventStatus.IGNORED, reason)
    assert mirrored(session)[who] == sorted(r for r in roles if r in set(CleverRole))
    with pytest.raises(NotFound):
        account_view(session, who)


def test_users_created_of_a_superintendent_with_district_admin_and_staff_makes_an_admin(
    session: Session,
) -> None:
    load_snapshot(session, example())
    roles = {"district_admin": {"title": "Superintendent"}, "staff": {"title": "Superintendent"}}
    routed = route(session, "c-2", "users.created", user(SUPERINTENDENT, roles))
    assert routed is not None and routed.status == EventStatus.DONE
    view = account_view(session, SUPERINTENDENT)
    assert view["roles"] == [Role.ADMIN] and view["district_reports"] == "allowed"
    assert mirrored(session)[SUPERINTENDENT] == [CleverRole.DISTRICT_ADMIN, CleverRole.STAFF]


def test_users_updated_of_a_teacher_who_also_became_staff_keeps_the_account(
    session: Session,
) -> None:
    data = example()
    load_snapshot(session, data)
    before = account_view(session, KIM)
    kim = next(u for u in data["users"] if u["id"] == KIM)
    routed = route(
        session,
        "u-staff",
        "users.updated",
        {**kim, "roles": {**kim["roles"], "staff": {"title": "Math Coach"}}},
        previous={"roles": kim["roles"]},
    )
    assert routed is not None and routed.status == EventStatus.DONE
    assert account_view(session, KIM) == before
    assert mirrored(session)[KIM] == [CleverRole.STAFF, CleverRole.TEACHER]


@pytest.mark.parametrize("with_previous", [True, False], ids=["previous", "no-previous"])
def test_teacher_losing_teacher_but_keeping_staff_is_converted_whole_and_mirrored_as_staff(
    session: Session, with_previous: bool
) -> None:
    load_snapshot(session, example())
    before = account_view(session, KIM)
    previous: dict[str, Any] | None = (
        {"roles": {"teacher": {}, "staff": {}}} if with_previous else None
    )
    routed = route(
        session,
        "u-lost",
        "users.updated",
        user(KIM, {"staff": {"title": "Math Coach"}}),
        previous=previous,
    )
    assert routed is not None and routed.status == EventStatus.DONE
    kim = account_view(session, KIM)
    # Left the program as a teacher: a grassroots account that keeps its login and its own class.
    assert (kim["kind"], kim["status"]) == (AccountKind.GRASSROOTS, AccountStatus.ACTIVE)
    assert kim["district"] is None and kim["roles"] == before["roles"] == [Role.TEACHER]
    assert ids(kim["classes"]) == ["class-math-club"]
    assert S1 not in ids(account_view(session, MARIA)["classes"])  # Kim taught 3a01 alone
    assert mirrored(session)[KIM] == [CleverRole.STAFF]
    # Later changes of the staff member still reach the mirror; the account stays as it is.
    routed = route(
        session,
        "u-lost-2",
        "users.updated",
        user(KIM, {"staff": {"title": "Coach"}, "contact": {}}),
        created="2026-10-02T00:00:00Z",
    )
    assert routed is not None and routed.status == EventStatus.IGNORED
    assert mirrored(session)[KIM] == [CleverRole.CONTACT, CleverRole.STAFF]
    assert account_view(session, KIM) == kim


def test_users_updated_of_a_staff_member_who_becomes_a_teacher_creates_the_account(
    session: Session,
) -> None:
    load_snapshot(session, example())
    routed = route(
        session,
        "u-grow",
        "users.updated",
        user(COUNSELOR, {"staff": {}, "teacher": {}}),
        previous={"roles": {"staff": {}}},
    )
    assert routed is not None and routed.status == EventStatus.DONE
    view = account_view(session, COUNSELOR)
    assert view["kind"] == AccountKind.DISTRICT and view["roles"] == [Role.TEACHER]
    assert mirrored(session)[COUNSELOR] == [CleverRole.STAFF, CleverRole.TEACHER]


def test_users_updated_of_a_contact_updates_the_mirror_and_is_ignored(session: Session) -> None:
    load_snapshot(session, example())
    routed = route(
        session, "u-contact", "users.updated", user(PARENT, {"contact": {}, "staff": {}})
    )
    assert routed is not None
    assert (routed.status, routed.reason) == (
        EventStatus.IGNORED,
        "no platform role (contact, staff): no account",
    )
    assert mirrored(session)[PARENT] == [CleverRole.CONTACT, CleverRole.STAFF]


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        (PARENT, "no platform role (contact): no account"),
        (COUNSELOR, "no platform role (staff): no account"),
    ],
)
def test_users_deleted_of_someone_without_an_account_removes_the_mirror_row_and_is_ignored(
    session: Session, who: str, reason: str
) -> None:
    load_snapshot(session, example())
    accounts = session.scalars(select(Account.id).order_by(Account.id)).all()
    routed = route(session, "d-mirror", "users.deleted", user(who, PARENT_ROLE))
    assert routed is not None and (routed.status, routed.reason) == (EventStatus.IGNORED, reason)
    assert who not in mirrored(session)
    assert session.scalars(select(Account.id).order_by(Account.id)).all() == accounts
    # The brake counts accounts only: this removal used none of the day's allowance.
    assert not brake.engaged(session, DISTRICT, percent=10, now=utcnow())


def test_users_deleted_of_a_district_account_converts_it_and_removes_the_mirror_row(
    session: Session,
) -> None:
    load_snapshot(session, example())
    routed = route(session, "d-steve", "users.deleted", user(STEVE, {"student": {}}))
    assert routed is not None and routed.status == EventStatus.DONE
    assert account_view(session, STEVE)["kind"] == AccountKind.GRASSROOTS
    assert STEVE not in mirrored(session)
    # Back on the roster: restored, and mirrored again.
    routed = route(
        session,
        "c-steve",
        "users.created",
        user(STEVE, {"student": {}}),
        created="2026-10-02T00:00:00Z",
    )
    assert routed is not None and routed.status == EventStatus.DONE
    assert account_view(session, STEVE)["kind"] == AccountKind.DISTRICT
    assert mirrored(session)[STEVE] == [CleverRole.STUDENT]


def test_users_deleted_held_by_the_brake_keeps_the_mirror_row(session: Session) -> None:
    load_snapshot(session, example())
    limits = events.Limits(brake_percent=10)
    for n, who in enumerate((STEVE, MARIA)):
        obj = user(who, {"student": {}})
        event = {
            "id": f"h-{n}",
            "type": "users.deleted",
            "created": f"2026-10-01T00:00:0{n}Z",
            "data": {"object": obj},
        }
        ingest(session, event, source="webhook")
        events.process_event(session, f"h-{n}", limits)
    assert stored(session, "h-1")[0] == EventStatus.HELD
    assert STEVE not in mirrored(session) and MARIA in mirrored(session)


# Objects as Clever's v3.0 and v3.1 API descriptions have them (Clever/swagger-api).
RESOURCE = {  # v3.0's Resource: no id at all
    "created": "2026-09-01T00:00:00Z",
    "district": DISTRICT,
    "roles": ["teacher", "student"],
    "sourcedId": "res-1",
    "title": "Fractions unit",
    "updated": "2026-09-01T00:00:00Z",
    "vendorResourceId": "vendor-1",
}
SCHOOL = {
    "id": "5b2a6f0c8e9d7a00aaaa0001",
    "district": DISTRICT,
    "name": "Example Elementary",
    "low_grade": "Kindergarten",
    "high_grade": "6",
    "principal": {"name": "A. Principal", "email": None},
    "location": {"city": "Springfield"},
}
TERM = {"id": "term-1", "district": DISTRICT, "name": "Fall", "start_date": "2026-08-20"}
COURSE = {"id": "course-1", "district": DISTRICT, "name": "Math 5", "number": "M5"}
DISTRICT_OBJECT = {
    "id": DISTRICT,
    "name": "Example Independent School District",
    "state": "success",
    "district_contact": {"id": "dc-1", "title": "IT"},
    "login_methods": ["clever"],
}


@pytest.mark.parametrize(
    ("type_", "data"),
    [
        ("resources.created", {"object": RESOURCE}),
        ("resources.deleted", {"object": {**RESOURCE, "id": "res-1"}}),
        ("schools.updated", {"object": SCHOOL, "previous_attributes": {"name": "Old"}}),
        ("terms.deleted", {"object": TERM}),
        ("courses.created", {"object": COURSE}),
        ("districts.updated", {"object": DISTRICT_OBJECT}),
        ("districts.created", {"object": "not an object"}),
        ("schools.created", None),
        ("admins.updated", {"object": {"id": 7}}),
    ],
    ids=[
        "resource-without-id",
        "resource",
        "school",
        "term",
        "course",
        "district-updated",
        "district-created-odd-object",
        "school-without-data",
        "resource-clever-adds-later",
    ],
)
def test_events_of_other_clever_resources_are_ignored_with_the_reason_never_rejected(
    session: Session, type_: str, data: dict[str, Any] | None
) -> None:
    load_snapshot(session, example())
    event: dict[str, Any] = {"id": "o-1", "type": type_, "created": "2026-10-01T00:00:00Z"}
    if data is not None:
        event["data"] = data
    outcome = ingest(session, event, source="webhook")
    reason = f"event type {type_} does not concern conversions"
    assert (outcome.new, outcome.status) == (True, EventStatus.IGNORED)
    assert stored(session, "o-1") == (EventStatus.IGNORED, reason)
    # Final already: no worker has anything to do with it.
    assert events.process_event(session, "o-1", events.Limits()) is None
    assert account_view(session, PAT)["district_reports"] == "allowed"


def test_an_event_of_another_resource_stored_accepted_earlier_is_ignored_by_the_worker(
    session: Session,
) -> None:
    event = {"id": "o-2", "type": "terms.updated", "data": {"object": TERM}}
    ingest(session, event, source="webhook")
    session.execute(
        update(RosterEvent).where(RosterEvent.id == "o-2").values(status=EventStatus.ACCEPTED)
    )
    routed = events.process_event(session, "o-2", events.Limits())
    assert routed is not None
    assert (routed.status, routed.reason) == (
        EventStatus.IGNORED,
        "event type terms.updated does not concern conversions",
    )


def test_an_event_dated_far_ahead_is_rejected_and_later_events_about_its_user_still_apply(
    session: Session,
) -> None:
    load_snapshot(session, example())
    obj = {"id": STEVE, "district": DISTRICT, "roles": {"student": {}}}
    ahead = {"id": "u-9999", "type": "users.created", "created": "9999-12-31T00:00:00Z"}
    assert ingest(session, {**ahead, "data": {"object": obj}}, source="webhook").status == (
        "rejected"
    )
    # Nothing about the rejected one reached the fence: an event of today is not stale.
    assert events.process_event(session, "u-9999", events.Limits()) is None
    ingest(
        session,
        {
            "id": "d-today",
            "type": "users.deleted",
            "created": utcnow().isoformat(),
            "data": {"object": obj},
        },
        source="webhook",
    )

    routed = events.process_event(session, "d-today", events.Limits())

    assert routed is not None and routed.status == "done"
    assert account_view(session, STEVE)["kind"] == "grassroots"
    error = session.scalar(select(RosterEvent.error).where(RosterEvent.id == "u-9999"))
    assert error is not None and "minutes ahead of the time it was received" in error
