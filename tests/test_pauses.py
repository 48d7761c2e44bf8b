"""Roster pauses and a district's own brake (SPEC §4 "Brake" and "Pauses", §5.5, §5.6): the rule
as plain functions on both backends, the command line, the ops API, and the migration that
brings them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text, update
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
from tasks.inbox import ingest
from tasks.roster import CleverSection, CleverUser, load_snapshot
from tasks.view import account_view
from tests.support.app_env import CLOSED_BROKER, Configure, assert_error
from tests.support.scenario import (
    DISTRICT,
    KIM,
    LEO,
    MARIA,
    RIVERA,
    S1,
    S3,
    STEVE,
    example,
    ids,
)
from worker import db
from worker.api import app
from worker.cli import main
from worker.db import make_engine
from worker.migrate import downgrade, upgrade
from worker.pipeline import pipeline_status

HOUR = timedelta(hours=1)
OTHER = "5b2a6f0c8e9d7a00ffff0001"  # a second district, with nobody in it
NEWCOMER = "58c81dcea36279271500beef"
# Clever times of changes made before the tests run: a `created` ahead of our clock is rejected.
T1, T2, T3 = "2026-10-20T10:00:00Z", "2026-10-22T10:00:00Z", "2026-11-03T10:00:00Z"
FULL = events.Limits(brake_percent=100)
OPS_TOKEN = "ops-token-for-the-pause-tests"


def user(user_id: str, roles: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"id": user_id, "district": DISTRICT, "roles": roles, **extra}


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
    assert exited.status == EventStatus.DONE and exited.exit_id is not None


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


# --------------------------------------------------------------------------------------------
# The command line (SPEC §5.6): 0 success, 1 error, 2 misuse


@pytest.fixture
def cli(configure: Configure, database_url: str) -> CliRunner:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=OPS_TOKEN)
    with db.session_scope() as session:
        load_snapshot(session, example())
    return CliRunner()


def test_pause_add_list_and_remove_from_the_command_line(cli: CliRunner) -> None:
    added = cli.invoke(
        main,
        ["pause", "add", "--district", DISTRICT, "--until", "2099-01-05", "--reason", "holidays"],
    )
    assert added.exit_code == 0, added.output
    assert added.stdout.startswith("pause ") and "until 2099-01-05T00:00:00+00:00" in added.stdout
    everyone = cli.invoke(main, ["pause", "add", "--from", "2098-12-21", "--until", "2099-01-05"])
    assert everyone.exit_code == 0, everyone.output

    listed = cli.invoke(main, ["pause", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["district"], r["until"], r["reason"], r["deferred"]) for r in rows] == [
        (DISTRICT, "2099-01-05T00:00:00+00:00", "holidays", 0),
        (None, "2099-01-05T00:00:00+00:00", None, 0),
    ]
    assert datetime.fromisoformat(rows[0]["from"]) <= utcnow()  # --from defaults to now
    assert rows[1]["from"] == "2098-12-21T00:00:00+00:00"
    text_list = cli.invoke(main, ["pause", "list"])
    assert "every district from 2098-12-21" in text_list.stdout and "2 pause(s)" in text_list.stdout

    removed = cli.invoke(main, ["pause", "remove", str(rows[0]["id"])])
    assert removed.exit_code == 0, removed.output
    assert f"pause {rows[0]['id']} removed; 0 deferred event(s) released" in removed.stdout
    again = cli.invoke(main, ["pause", "remove", str(rows[0]["id"])])
    assert again.exit_code == 1 and f"no pause {rows[0]['id']}" in again.stderr
    assert [r["id"] for r in json.loads(cli.invoke(main, ["pause", "list", "--json"]).stdout)] == [
        rows[1]["id"]
    ]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--until", "soon"], 2, "--until 'soon' is not an ISO 8601 date or time"),
        (["--from", "2099-02-30", "--until", "2099-03-01"], 2, "--from '2099-02-30' is not"),
        (["--from", "2099-01-05", "--until", "2099-01-01"], 2, "before it starts"),
        (["--until", "2001-01-01"], 2, "before it starts"),
        ([], 2, "Missing option '--until'"),
        (["--district", "5b2a6f0c8e9d7a00deadbeef", "--until", "2099-01-01"], 1, "no district"),
    ],
    ids=["unparsable", "no-such-day", "ends-before-start", "ended", "no-until", "unknown-district"],
)
def test_pause_add_with_bad_input_fails_and_stores_nothing(
    cli: CliRunner, args: list[str], code: int, message: str
) -> None:
    result = cli.invoke(main, ["pause", "add", *args])
    assert result.exit_code == code, result.output
    assert message in result.stderr
    with db.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Pause)) == 0


def test_pause_remove_of_something_that_is_no_pause_id_is_misuse(cli: CliRunner) -> None:
    assert cli.invoke(main, ["pause", "remove", "winter"]).exit_code == 2


def test_district_policy_sets_and_clears_the_districts_own_brake(cli: CliRunner) -> None:
    shown = cli.invoke(main, ["district", "policy", DISTRICT, "--brake-percent", "2.5"])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.strip() == f"district {DISTRICT}: admin_removal=convert, brake_percent=2.5"
    as_json = cli.invoke(main, ["district", "policy", DISTRICT, "--json"])
    assert json.loads(as_json.stdout)["policy"] == {
        "admin_removal": "convert",
        "brake_percent": 2.5,
    }
    cleared = cli.invoke(main, ["district", "policy", DISTRICT, "--brake-percent", "default"])
    assert "brake_percent=default (REMOVAL_BRAKE_PERCENT=10)" in cleared.stdout
    with db.session_scope() as session:
        district = session.get(District, DISTRICT)
        assert district is not None and district.brake_percent is None


@pytest.mark.parametrize("given", ["0", "101", "-3", "ten", "nan"])
def test_district_policy_refuses_a_brake_percent_out_of_range(cli: CliRunner, given: str) -> None:
    result = cli.invoke(main, ["district", "policy", DISTRICT, "--brake-percent", given])
    assert result.exit_code == 2, result.output
    assert "--brake-percent" in result.stderr
    with db.session_scope() as session:
        district = session.get(District, DISTRICT)
        assert district is not None and district.brake_percent is None


def test_deferred_events_are_listed_discarded_and_counted_from_the_command_line(
    cli: CliRunner,
) -> None:
    with db.session_scope() as session:
        pause(session)
        route(session, "cli-1", "users.deleted", user(STEVE, {"student": {}}))
    listed = cli.invoke(main, ["events", "list", "--status", "deferred", "--json"])
    assert [e["id"] for e in json.loads(listed.stdout)] == ["cli-1"]
    status = json.loads(cli.invoke(main, ["status", "--json"]).stdout)
    assert (status["deferred"], status["pending"]) == (1, 0)
    assert "deferred 1" in cli.invoke(main, ["status"]).stdout
    replayed = cli.invoke(main, ["events", "replay", "cli-1"])
    assert replayed.exit_code == 0
    assert "cli-1: deferred by a roster pause (applied when it ends)" in replayed.stdout

    discarded = cli.invoke(main, ["events", "discard", "cli-1"])
    assert discarded.exit_code == 0 and "cli-1: discarded (it was deferred)" in discarded.stdout
    again = cli.invoke(main, ["events", "discard", "cli-1"])
    assert again.exit_code == 1 and "only a held or a deferred event" in again.stderr


# --------------------------------------------------------------------------------------------
# The ops API (SPEC §5.5)

AUTH = {"Authorization": f"Bearer {OPS_TOKEN}"}


@pytest.fixture
def client(cli: CliRunner) -> Iterator[TestClient]:
    with TestClient(app, headers=AUTH) as test_client:
        yield test_client


def test_pauses_are_added_listed_and_removed_over_http(client: TestClient) -> None:
    made = client.post(
        "/ops/pauses",
        json={"district": None, "from": None, "until": "2099-01-05", "reason": "winter break"},
    )
    assert made.status_code == 201, made.text
    pause_ = made.json()
    assert set(pause_) == {"id", "district", "from", "until", "reason", "deferred"}
    assert (pause_["district"], pause_["until"], pause_["reason"]) == (
        None,
        "2099-01-05T00:00:00+00:00",
        "winter break",
    )
    assert datetime.fromisoformat(pause_["from"]) <= utcnow()
    one = client.post(
        "/ops/pauses",
        json={"district": DISTRICT, "from": "2098-06-15T00:00:00Z", "until": "2098-08-20"},
    )
    assert one.status_code == 201 and one.json()["reason"] is None
    assert [p["id"] for p in client.get("/ops/pauses").json()] == [pause_["id"], one.json()["id"]]

    with db.session_scope() as session:
        route(session, "http-1", "users.deleted", user(STEVE, {"student": {}}))
    assert client.get("/ops/pauses").json()[0]["deferred"] == 1
    removed = client.delete(f"/ops/pauses/{pause_['id']}")
    assert removed.status_code == 200
    assert removed.json() == {**pause_, "deferred": 1, "released": 1}
    with db.session_scope() as session:
        # Back in the inbox; the broker is down here, so it waits there for the relay.
        assert stored(session, "http-1").status == EventStatus.ACCEPTED
    assert [p["id"] for p in client.get("/ops/pauses").json()] == [one.json()["id"]]
    assert_error(client.delete(f"/ops/pauses/{pause_['id']}"), 404, "not_found")
    assert_error(client.delete("/ops/pauses/winter"), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (b"{not json", 400, "invalid_json", "not JSON"),
        (b"[]", 400, "invalid_json", "district"),
        (b'{"until": "2099-01-05"}', 422, "invalid_pause", "'district' is required"),
        (b'{"district": null}', 422, "invalid_pause", "'until' is required"),
        (b'{"district": 7, "until": "2099-01-05"}', 422, "invalid_pause", "'district'"),
        (b'{"district": null, "until": "soon"}', 422, "invalid_pause", "'until' 'soon' is not"),
        (b'{"district": null, "until": 20990105}', 422, "invalid_pause", "'until' is a string"),
        (
            b'{"district": null, "from": "2099-01-05", "until": "2099-01-01"}',
            422,
            "invalid_pause",
            "before it starts",
        ),
        (b'{"district": null, "until": "2001-01-01"}', 422, "invalid_pause", "before it starts"),
        (
            b'{"district": "5b2a6f0c8e9d7a00deadbeef", "until": "2099-01-05"}',
            404,
            "not_found",
            "no district 5b2a6f0c8e9d7a00deadbeef",
        ),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "no-district",
        "no-until",
        "district-not-text",
        "unparsable",
        "until-not-text",
        "ends-before-start",
        "ended",
        "unknown-district",
    ],
)
def test_a_bad_pause_request_is_answered_with_the_error_shape_and_stores_nothing(
    client: TestClient, body: bytes, status: int, code: str, message: str
) -> None:
    response = client.post(
        "/ops/pauses", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, status, code)
    assert message in response.json()["message"]
    assert client.get("/ops/pauses").json() == []


def test_a_deferred_event_is_discarded_over_http(client: TestClient) -> None:
    with db.session_scope() as session:
        pause(session)
        route(session, "http-2", "users.deleted", user(STEVE, {"student": {}}))
    response = client.post("/ops/events/http-2/discard")
    assert response.status_code == 200
    assert response.json() == {"event": "http-2", "status": "discarded", "was": "deferred"}
    assert_error(client.post("/ops/events/http-2/discard"), 409, "refused")
    assert_error(client.post("/ops/events/nope/discard"), 404, "not_found")
    assert client.get("/ops/status").json()["deferred"] == 0


def test_metrics_count_deferred_events(client: TestClient) -> None:
    with db.session_scope() as session:
        pause(session)
        route(session, "m-1", "users.deleted", user(STEVE, {"student": {}}))
    lines = client.get("/metrics").text.splitlines()
    assert "grassroots_deferred_events 1.0" in lines


# --------------------------------------------------------------------------------------------
# The migration


def test_the_migration_keeps_every_row_and_its_references_on_a_populated_database(
    database_url: str,
) -> None:
    # SQLite rebuilds a table to change its constraints: the rows that reference it (accounts of
    # a district, dead letters of an event) must survive the copy.
    downgrade(database_url, "0006")
    engine = make_engine(database_url)
    stamp = "2026-01-01 00:00:00+00:00"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO districts (id, name, status, admin_removal, created_at, updated_at)"
                " VALUES ('d1', 'D', 'active', 'convert', :t, :t)"
            ),
            {"t": stamp},
        )
        conn.execute(
            text(
                "INSERT INTO accounts (id, clever_id, is_admin, is_teacher, is_student, kind,"
                " status, district_id, created_at, updated_at) VALUES ('a1', 'a1', false, false,"
                " true, 'district', 'active', 'd1', :t, :t)"
            ),
            {"t": stamp},
        )
        conn.execute(
            text(
                "INSERT INTO roster_events (id, type, source, payload, status, attempts,"
                " brake_released, received_at, updated_at) VALUES ('e1', 'users.deleted',"
                " 'webhook', '{}', 'dead', 1, false, :t, :t)"
            ),
            {"t": stamp},
        )
        conn.execute(
            text(
                "INSERT INTO dead_letters (event_id, task, args, reason, error, attempts,"
                " first_failed_at, last_failed_at) VALUES ('e1', 't', '{}', 'r', 'e', 1, :t, :t)"
            ),
            {"t": stamp},
        )
    engine.dispose()
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT event_id FROM dead_letters")).scalars().all() == ["e1"]
        assert conn.execute(text("SELECT district_id FROM accounts")).scalars().all() == ["d1"]
        conn.execute(text("UPDATE roster_events SET status = 'deferred' WHERE id = 'e1'"))
    with engine.begin() as conn, pytest.raises(Exception, match=r"(?i)check"):
        conn.execute(text("UPDATE districts SET brake_percent = 0 WHERE id = 'd1'"))
    engine.dispose()
