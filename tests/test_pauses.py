"""Roster pauses and a district's own brake (SPEC §4 "Brake" and "Pauses"): the rule as plain
functions on both backends — what a pause defers and what it does not, what its end releases,
an operator's pauses and bad input, and a district's own brake percent. The command line, the
ops API and the migration are in ``test_pauses_cli_api.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models import (
    AccountKind,
    AuditRecord,
    District,
    EventStatus,
    Pause,
    RosterEvent,
    RosterSync,
    utcnow,
)
from tasks import brake, events, pauses, policy, roster_syncs
from tasks import reconcile as reconciling
from tasks.errors import InvalidInput, NotFound, Refused
from tasks.roster import CleverSection, CleverUser, load_snapshot
from tasks.view import account_view
from tests.support.pauses import FULL, HOUR, T1, T2, T3, pause, route, stored, user
from tests.support.scenario import DISTRICT, KIM, LEO, MARIA, RIVERA, S1, S3, STEVE, example, ids
from worker.pipeline import pipeline_status

OTHER = "5b2a6f0c8e9d7a00ffff0001"  # a second district, with nobody in it
NEWCOMER = "58c81dcea36279271500beef"


def section(section_id: str, teachers: list[str], students: list[str]) -> dict[str, Any]:
    name = next(s["name"] for s in example()["sections"] if s["id"] == section_id)
    return {
        "id": section_id,
        "district": DISTRICT,
        "name": name,
        "teacher": teachers[0],
        "teachers": teachers,
        "students": students,
    }


def time_passes(session: Session, pause_id: int) -> None:
    """The pause's end comes: as if its end had been reached (ends are compared with now)."""
    now = utcnow()
    session.execute(
        update(Pause)
        .where(Pause.id == pause_id)
        .values(starts_at=now - 2 * HOUR, ends_at=now - timedelta(seconds=1))
    )


def release_and_apply(session: Session, limits: events.Limits = FULL) -> dict[str, str]:
    """What beat's release and the workers do, in the order the release sends them."""
    outcome: dict[str, str] = {}
    for event_id in pauses.release_due(session, now=utcnow()):
        routed = events.process_event(session, event_id, limits)
        assert routed is not None
        outcome[event_id] = routed.status
    return outcome


@pytest.fixture
def seeded(session: Session) -> Session:
    load_snapshot(session, example())
    session.add(District(id=OTHER, name="Another district"))
    session.flush()
    return session


# --------------------------------------------------------------------------------------------
# What a pause defers, and what it does not


DESTRUCTIVE: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {
    "users.deleted": (user(STEVE, {"student": {}}), None),
    "users.updated": (
        user(RIVERA, {"teacher": {}}),
        {"roles": {"teacher": {}, "district_admin": {}}},
    ),
    "sections.deleted": (section(S3, [RIVERA], [MARIA, LEO]), None),
    "sections.updated": (section(S1, [KIM], [MARIA]), {"students": [STEVE, MARIA]}),
}


@pytest.mark.parametrize("type_", list(DESTRUCTIVE))
def test_a_destructive_change_during_a_pause_is_deferred_naming_the_pause_and_changes_nothing(
    seeded: Session, type_: str
) -> None:
    made = pause(seeded)
    views = {p: account_view(seeded, p) for p in (STEVE, MARIA, RIVERA, KIM, LEO)}
    obj, previous = DESTRUCTIVE[type_]
    routed = route(seeded, "p-1", type_, obj, previous=previous)

    assert routed.status == EventStatus.DEFERRED
    ev = stored(seeded, "p-1")
    assert (ev.status, ev.pause_id) == (EventStatus.DEFERRED, made["id"])
    assert ev.error is not None and f"pause {made['id']}" in ev.error
    assert "winter break" in ev.error and made["until"] in ev.error
    assert {p: account_view(seeded, p) for p in views} == views
    # A worker that gets it again has nothing to do until the pause ends.
    assert events.process_event(seeded, "p-1", FULL) is None
    assert pauses.listed(seeded, now=utcnow())[0]["deferred"] == 1


@pytest.mark.parametrize("type_", list(DESTRUCTIVE))
def test_the_same_change_applies_at_once_without_a_pause(seeded: Session, type_: str) -> None:
    pause(seeded, district=OTHER)  # another district's pause covers nothing here
    pause(seeded, starts=HOUR, ends=2 * HOUR)  # one to come covers nothing yet
    obj, previous = DESTRUCTIVE[type_]
    assert route(seeded, "p-2", type_, obj, previous=previous).status == EventStatus.DONE


def test_additions_and_field_updates_still_apply_during_a_pause(seeded: Session) -> None:
    pause(seeded)
    newcomer = route(seeded, "a-1", "users.created", user(NEWCOMER, {"student": {}}))
    grown = route(
        seeded,
        "a-2",
        "sections.updated",
        section(S3, [RIVERA], [MARIA, LEO, NEWCOMER]),
        previous={"students": [MARIA, LEO]},
    )
    renamed = route(
        seeded,
        "a-3",
        "users.updated",
        user(KIM, {"teacher": {}}, email="alex.kim@example-isd.org"),
        previous={"email": "a.kim@example-isd.org"},
    )
    gained = route(
        seeded,
        "a-4",
        "users.updated",
        user(KIM, {"teacher": {}, "district_admin": {}}, email="alex.kim@example-isd.org"),
        created=T2,
        previous={"roles": {"teacher": {}}},
    )

    assert [r.status for r in (newcomer, grown, renamed, gained)] == [EventStatus.DONE] * 4
    assert ids(account_view(seeded, NEWCOMER)["classes"]) == [S3]
    kim = account_view(seeded, KIM)
    assert kim["email"] == "alex.kim@example-isd.org" and kim["roles"] == ["admin", "teacher"]


def test_a_role_loss_is_deferred_whole_with_the_field_changes_it_carries(seeded: Session) -> None:
    pause(seeded)
    routed = route(
        seeded,
        "r-1",
        "users.updated",
        user(RIVERA, {"teacher": {}}, email="new.rivera@example-isd.org"),
        previous={"roles": {"teacher": {}, "district_admin": {}}},
    )
    assert routed.status == EventStatus.DEFERRED
    rivera = account_view(seeded, RIVERA)
    assert rivera["email"] == "j.rivera@example-isd.org" and rivera["roles"] == ["admin", "teacher"]


def test_a_district_exit_and_a_restore_are_never_paused(seeded: Session) -> None:
    pause(seeded)
    assert route(seeded, "x-0", "users.deleted", user(STEVE, {"student": {}})).status == (
        EventStatus.DEFERRED
    )
    exited = route(seeded, "x-1", "districts.deleted", {"id": DISTRICT, "name": "x"})
    assert exited.status == EventStatus.DONE and exited.exit_plan is not None


def test_a_held_removal_an_operator_releases_during_a_pause_applies(seeded: Session) -> None:
    limits = events.Limits(brake_percent=10)
    for n, who in enumerate((STEVE, MARIA)):
        route(seeded, f"o-{n}", "users.deleted", user(who, {"student": {}}), limits=limits)
    assert stored(seeded, "o-1").status == EventStatus.HELD
    pause(seeded)
    assert brake.release_held(seeded, event_id="o-1", by="test") == ["o-1"]
    routed = events.process_event(seeded, "o-1", limits)
    assert routed is not None and routed.status == EventStatus.DONE
    assert account_view(seeded, MARIA)["kind"] == AccountKind.GRASSROOTS


def test_a_converted_account_reappearing_during_a_pause_is_restored(seeded: Session) -> None:
    before = account_view(seeded, STEVE)
    assert route(seeded, "c-0", "users.deleted", user(STEVE, {"student": {}})).status == "done"
    pause(seeded)
    back = route(seeded, "c-1", "users.created", user(STEVE, {"student": {}}), created=T2)
    assert back.status == EventStatus.DONE
    assert account_view(seeded, STEVE) == before


def _example_pull(*, without: set[str], sections: bool = True) -> reconciling.Pull:
    """The example district as a complete pull would find it, less the users ``without``, and
    with no section at all unless ``sections``."""
    data = example()
    users = (reconciling.pulled_user(CleverUser.model_validate(r)) for r in data["users"])
    pulled = (reconciling.pulled_section(CleverSection.model_validate(r)) for r in data["sections"])
    return reconciling.Pull(
        district_id=DISTRICT,
        district_name=data["districts"][0]["name"],
        users={u.id: u for u in users if u.id not in without},
        sections={s.id: s for s in pulled} if sections else {},
        started_at=utcnow(),
    )


def test_a_sync_during_a_pause_records_its_removals_and_the_workers_defer_them(
    seeded: Session,
) -> None:
    pull = _example_pull(without={STEVE})
    pause(seeded)
    roster_syncs.begin(seeded, DISTRICT, "sync-1", trigger="test", dry_run=False)
    report = reconciling.reconcile(seeded, pull, "sync-1", dry_run=False, brake_percent=100)

    assert report.events == [f"sync:sync-1:users.deleted:{STEVE}"]
    routed = events.process_event(seeded, report.events[0], FULL)
    assert routed is not None and routed.status == EventStatus.DEFERRED
    assert account_view(seeded, STEVE)["kind"] == AccountKind.DISTRICT


# --------------------------------------------------------------------------------------------
# What a pause's end releases


def test_when_the_pause_ends_its_removals_apply_in_clever_order(seeded: Session) -> None:
    made = pause(seeded)
    # Received newest first: the release sends them oldest first, whatever their arrival.
    later = route(seeded, "o-2", "users.deleted", user(RIVERA, {"teacher": {}}), created=T2)
    earlier = route(
        seeded,
        "o-1",
        "users.updated",
        user(RIVERA, {"teacher": {}}),
        created=T1,
        previous={"roles": {"teacher": {}, "district_admin": {}}},
    )
    assert {later.status, earlier.status} == {EventStatus.DEFERRED}
    assert pauses.release_due(seeded, now=utcnow()) == []  # still running

    # A worker counted an attempt of each; being deferred was no failure: a fresh budget.
    seeded.execute(update(RosterEvent).values(attempts=1))
    time_passes(seeded, made["id"])
    assert release_and_apply(seeded) == {"o-1": "done", "o-2": "done"}
    assert stored(seeded, "o-1").attempts == stored(seeded, "o-2").attempts == 0
    assert account_view(seeded, RIVERA)["kind"] == AccountKind.GRASSROOTS
    assert pauses.listed(seeded, now=utcnow()) == []
    released = seeded.scalar(
        select(func.count()).where(
            AuditRecord.action == "release", AuditRecord.trigger == f"pause:{made['id']}"
        )
    )
    assert released == 2


def test_someone_who_left_and_came_back_during_the_pause_keeps_everything(
    seeded: Session,
) -> None:
    before = {p: account_view(seeded, p) for p in (STEVE, MARIA, KIM)}
    made = pause(seeded)
    assert route(seeded, "l-1", "users.deleted", user(STEVE, {"student": {}})).status == (
        "deferred"
    )
    dropped = route(
        seeded,
        "l-2",
        "sections.updated",
        section(S1, [KIM], [MARIA]),
        previous={"students": [STEVE, MARIA]},
    )
    assert dropped.status == EventStatus.DEFERRED
    steve = next(u for u in example()["users"] if u["id"] == STEVE)
    back = route(seeded, "l-3", "users.created", steve, created=T3)
    readded = route(
        seeded,
        "l-4",
        "sections.updated",
        section(S1, [KIM], [STEVE, MARIA]),
        created=T3,
        previous={"students": [MARIA]},
    )
    assert (back.status, readded.status) == (EventStatus.DONE, EventStatus.DONE)

    time_passes(seeded, made["id"])
    assert release_and_apply(seeded) == {"l-1": "stale", "l-2": "stale"}
    assert {p: account_view(seeded, p) for p in before} == before


def test_the_pause_comes_before_the_fence_which_decides_at_release(seeded: Session) -> None:
    # A newer event of Steve is applied first; the older removal arriving during the pause is
    # deferred all the same (not stale), and found stale when it is released.
    assert route(seeded, "f-2", "users.created", user(STEVE, {"student": {}}), created=T2).status
    made = pause(seeded)
    assert route(seeded, "f-1", "users.deleted", user(STEVE, {"student": {}})).status == (
        EventStatus.DEFERRED
    )
    seeded.execute(update(Pause).where(Pause.id == made["id"]).values(removed_at=utcnow()))
    assert release_and_apply(seeded) == {"f-1": "stale"}


def test_released_removals_go_through_the_brake(seeded: Session) -> None:
    made = pause(seeded)
    for n, who in enumerate((STEVE, MARIA, LEO)):
        obj = user(who, {"student": {}})
        assert route(seeded, f"b-{n}", "users.deleted", obj, created=f"2026-11-2{n}T00:00:00Z")
    time_passes(seeded, made["id"])
    # Six accounts at 10 %: one removal a day passes, the others wait for an operator.
    assert release_and_apply(seeded, events.Limits(brake_percent=10)) == {
        "b-0": "done",
        "b-1": "held",
        "b-2": "held",
    }


def test_a_removal_another_pause_still_covers_is_deferred_again_by_it(seeded: Session) -> None:
    everyone = pause(seeded, ends=HOUR)
    district = pause(seeded, district=DISTRICT, ends=3 * HOUR, reason=None)
    # The one that ends last defers it.
    assert route(seeded, "d-1", "users.deleted", user(STEVE, {"student": {}})).status
    assert stored(seeded, "d-1").pause_id == district["id"]
    seeded.execute(
        update(RosterEvent).where(RosterEvent.id == "d-1").values(pause_id=everyone["id"])
    )
    time_passes(seeded, everyone["id"])
    assert release_and_apply(seeded) == {"d-1": "deferred"}
    assert stored(seeded, "d-1").pause_id == district["id"]
    pauses.remove(seeded, district["id"], by="test", now=utcnow())
    assert release_and_apply(seeded) == {"d-1": "done"}


# --------------------------------------------------------------------------------------------
# An operator's pauses, and bad input


def test_pauses_are_listed_with_what_they_hold_and_removed_ones_are_gone(seeded: Session) -> None:
    everyone = pause(seeded, reason=None)
    later = pause(seeded, district=OTHER, starts=2 * HOUR, ends=3 * HOUR, reason="summer")
    route(seeded, "l-1", "users.deleted", user(STEVE, {"student": {}}))
    listed = pauses.listed(seeded, now=utcnow())
    assert [p["id"] for p in listed] == [everyone["id"], later["id"]]
    assert listed[0] == {**everyone, "deferred": 1} and listed[0]["district"] is None
    assert set(listed[1]) == {"id", "district", "from", "until", "reason", "deferred"}
    assert (listed[1]["district"], listed[1]["reason"]) == (OTHER, "summer")

    removed = pauses.remove(seeded, later["id"], by="test", now=utcnow())
    assert removed == later
    assert [p["id"] for p in pauses.listed(seeded, now=utcnow())] == [everyone["id"]]
    with pytest.raises(NotFound, match=f"no pause {later['id']}"):
        pauses.remove(seeded, later["id"], by="test", now=utcnow())
    with pytest.raises(NotFound, match="no pause 999999"):
        pauses.remove(seeded, 999999, by="test", now=utcnow())


@pytest.mark.parametrize(
    ("starts", "ends", "district", "error", "message"),
    [
        (HOUR, HOUR / 2, None, InvalidInput, "before it starts"),
        (None, timedelta(0), None, InvalidInput, "before it starts"),
        (-2 * HOUR, -HOUR, None, InvalidInput, "over already"),
        (None, HOUR, "5b2a6f0c8e9d7a00deadbeef", NotFound, "no district 5b2a6f0c8e9d7a00deadbeef"),
    ],
    ids=["ends-before-it-starts", "ends-as-it-starts", "over-already", "unknown-district"],
)
def test_a_pause_that_cannot_be_is_refused_and_nothing_is_stored(
    seeded: Session,
    starts: timedelta | None,
    ends: timedelta,
    district: str | None,
    error: type[Exception],
    message: str,
) -> None:
    now = utcnow()
    with pytest.raises(error, match=message):
        pauses.add(
            seeded,
            district_id=district,
            starts_at=None if starts is None else now + starts,
            ends_at=now + ends,
            reason=None,
            by="test",
            now=now,
        )
    assert seeded.scalar(select(func.count()).select_from(Pause)) == 0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2026-12-21", datetime(2026, 12, 21, tzinfo=UTC)),
        ("2026-12-21T08:30:00Z", datetime(2026, 12, 21, 8, 30, tzinfo=UTC)),
        ("2026-12-21T08:30", datetime(2026, 12, 21, 8, 30, tzinfo=UTC)),
        ("2026-12-21T03:30:00-05:00", datetime(2026, 12, 21, 8, 30, tzinfo=UTC)),
    ],
)
def test_an_instant_is_iso_8601_in_utc_and_a_date_is_its_midnight(
    given: str, expected: datetime
) -> None:
    parsed = pauses.parse_instant(given, what="--until")
    assert parsed == expected and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("given", ["tomorrow", "2026-13-01", "21/12/2026", ""])
def test_an_unparsable_instant_is_named_in_the_error(given: str) -> None:
    with pytest.raises(InvalidInput, match=r"--until .* is not an ISO 8601 date or time"):
        pauses.parse_instant(given, what="--until")


def test_an_operator_discards_a_deferred_or_held_event_and_nothing_else(seeded: Session) -> None:
    made = pause(seeded)
    route(seeded, "z-1", "users.deleted", user(STEVE, {"student": {}}))
    assert pauses.discard(seeded, "z-1", by="test") == EventStatus.DEFERRED
    assert stored(seeded, "z-1").status == EventStatus.DISCARDED
    time_passes(seeded, made["id"])
    assert release_and_apply(seeded) == {}
    assert account_view(seeded, STEVE)["kind"] == AccountKind.DISTRICT
    with pytest.raises(Refused, match="is discarded: only a held or a deferred event"):
        pauses.discard(seeded, "z-1", by="test")
    with pytest.raises(NotFound):
        pauses.discard(seeded, "nope", by="test")
    held = [
        route(seeded, f"h-{n}", "users.deleted", user(w, {"student": {}}), limits=events.Limits())
        for n, w in enumerate((MARIA, LEO))
    ]
    assert [r.status for r in held] == ["done", "held"]
    assert pauses.discard(seeded, "h-1", by="test") == EventStatus.HELD
    assert stored(seeded, "h-1").status == EventStatus.DISCARDED


def test_deferred_events_are_counted_apart_from_pending(seeded: Session) -> None:
    pause(seeded)
    route(seeded, "s-1", "users.deleted", user(STEVE, {"student": {}}))
    found = pipeline_status(seeded, with_broker=False)
    assert (found["deferred"], found["pending"]) == (1, 0)


# --------------------------------------------------------------------------------------------
# A district's own brake


def test_a_districts_own_brake_percent_wins_over_the_default(seeded: Session) -> None:
    assert policy.set_policy(seeded, DISTRICT, brake_percent=10, by="test") == {
        "admin_removal": "convert",
        "brake_percent": 10,
    }
    statuses = [
        route(seeded, f"k-{n}", "users.deleted", user(w, {"student": {}}))
        for n, w in enumerate((STEVE, MARIA))
    ]
    # REMOVAL_BRAKE_PERCENT (FULL: 100) would let both through; the district's 10 % holds one.
    assert [r.status for r in statuses] == ["done", "held"]
    assert "over 10% of the district" in (statuses[1].reason or "")

    assert (
        policy.set_policy(seeded, DISTRICT, brake_percent=policy.DEFAULT_BRAKE, by="test")[
            "brake_percent"
        ]
        is None
    )
    assert route(seeded, "k-2", "users.deleted", user(LEO, {"student": {}})).status == "done"


def test_a_sync_predicts_what_the_districts_own_brake_holds(seeded: Session) -> None:
    pull = _example_pull(without={STEVE, MARIA, LEO}, sections=False)
    for n, percent in enumerate((None, 50.0)):
        policy.set_policy(seeded, DISTRICT, brake_percent=percent or policy.DEFAULT_BRAKE, by="t")
        roster_syncs.begin(seeded, DISTRICT, f"dry-{n}", trigger="test", dry_run=True)
        report = reconciling.reconcile(seeded, pull, f"dry-{n}", dry_run=True, brake_percent=100)
        # Three of six accounts leave: REMOVAL_BRAKE_PERCENT (100 here) holds none, nor does
        # the district's own 50 %.
        assert report.held == 0
    # The district's own 10 % lets one a day through.
    policy.set_policy(seeded, DISTRICT, brake_percent=10, by="t")
    roster_syncs.begin(seeded, DISTRICT, "dry-2", trigger="test", dry_run=True)
    assert reconciling.reconcile(seeded, pull, "dry-2", dry_run=True, brake_percent=100).held == 2
    assert seeded.get(RosterSync, "dry-2") is not None


@pytest.mark.parametrize("percent", [0, -5, 100.5, float("nan"), float("inf")])
def test_a_brake_percent_out_of_range_is_refused_and_nothing_stored(
    seeded: Session, percent: float
) -> None:
    with pytest.raises(InvalidInput, match="above 0 and at most 100"):
        policy.set_policy(seeded, DISTRICT, brake_percent=percent, by="test")
    district = seeded.get(District, DISTRICT, populate_existing=True)
    assert district is not None and district.brake_percent is None
