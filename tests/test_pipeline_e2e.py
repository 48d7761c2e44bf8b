"""Every SPEC §4 trigger end to end: a signed HTTP POST to a real receiver, a real Redis, real
``grassroots worker`` processes, a real Postgres; outcomes read back through the CLI."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import scenario
from tests.support.databases import PgDatabases
from tests.support.scenario import Copy, ids
from tests.support.stack import Stack, clever_event, running_stack, wait_until

pytestmark = pytest.mark.slow

_tags = (f"{n:04x}" for n in itertools.count(0xE000))


@pytest.fixture(scope="module")
def shared_stack(
    tmp_path_factory: pytest.TempPathFactory, pg_databases: PgDatabases
) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("stack"), pg_databases.new()) as s:
        yield s


class People:
    """One test's own copy of the example district, seeded into the shared stack."""

    def __init__(self, stack: Stack, copy: Copy) -> None:
        self.copy = copy
        path = stack.tmp / f"roster-{copy.tag}.json"
        path.write_text(json.dumps(copy.data))
        stack.cli("seed", str(path))
        c = copy
        self.district = c(scenario.DISTRICT)
        self.pat, self.rivera, self.kim = c(scenario.PAT), c(scenario.RIVERA), c(scenario.KIM)
        self.steve, self.maria, self.leo = (
            c(scenario.STEVE),
            c(scenario.MARIA),
            c(scenario.LEO),
        )
        self.s1, self.s2, self.s3 = c(scenario.S1), c(scenario.S2), c(scenario.S3)
        self.club = c("class-math-club")

    def event_id(self, name: str) -> str:
        return f"{self.copy.tag}-{name}"

    def user(self, uid: str, roles: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"id": uid, "district": self.district, "roles": roles, **extra}

    def section(self, sid: str, teachers: list[str], students: list[str]) -> dict[str, Any]:
        return {
            "id": sid,
            "district": self.district,
            "name": f"Section {sid[-2:]}",
            "teacher": teachers[0],
            "teachers": teachers,
            "students": students,
        }

    def event(
        self,
        name: str,
        type_: str,
        obj: dict[str, Any],
        *,
        created: str,
        previous: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return clever_event(self.event_id(name), type_, obj, created=created, previous=previous)


@pytest.fixture
def stack(shared_stack: Stack) -> Stack:
    return shared_stack


@pytest.fixture
def p(shared_stack: Stack) -> People:
    return People(shared_stack, Copy(next(_tags)))


def send(stack: Stack, event: dict[str, Any]) -> str:
    response = stack.post(event)
    assert response.status_code == 202, response.text
    assert response.json() == {"event": event["id"], "status": "accepted"}

    def finished() -> str | None:
        status: str = stack.event(event["id"])["status"]
        return None if status in ("accepted", "processing") else status

    status = wait_until(finished, what=f"event {event['id']} to finish")
    assert status is not None
    return status


T0 = "2026-10-01T00:00:00Z"


def test_users_deleted_converts_the_student(stack: Stack, p: People) -> None:
    assert (
        send(stack, p.event("e1", "users.deleted", p.user(p.steve, {"student": {}}), created=T0))
        == "done"
    )
    steve = stack.cli_json("account", "show", p.steve, "--json")
    assert steve == stack.account(p.steve)
    assert steve["kind"] == "grassroots" and ids(steve["classes"]) == [p.club]
    assert steve["coaches"] == [p.kim]


def test_users_updated_losing_district_admin_keeps_teacher(stack: Stack, p: People) -> None:
    event = p.event(
        "e2",
        "users.updated",
        p.user(p.rivera, {"teacher": {}}),
        created=T0,
        previous={"roles": {"teacher": {}, "district_admin": {}}},
    )
    assert stack.ops("GET", f"/ops/accounts/{p.rivera}/district-reports").status_code == 200
    assert send(stack, event) == "done"
    rivera = stack.account(p.rivera)
    assert rivera["roles"] == ["teacher"] and rivera["kind"] == "district"
    assert rivera["district_reports"] == "denied" and ids(rivera["classes"]) == [p.s2, p.s3]
    denied = stack.ops("GET", f"/ops/accounts/{p.rivera}/district-reports")
    assert denied.status_code == 403


def test_sections_deleted_removes_the_class_for_everyone(stack: Stack, p: People) -> None:
    gone = p.section(p.s1, [p.kim], [p.steve, p.maria])
    assert send(stack, p.event("e3", "sections.deleted", gone, created=T0)) == "done"
    for person in (p.kim, p.steve, p.maria):
        assert p.s1 not in ids(stack.account(person)["classes"])
    assert p.copy("goal-g5-math") not in ids(stack.account(p.maria)["goals"])


def test_sections_updated_that_shrank_removes_enrollment_and_teacher(
    stack: Stack, p: People
) -> None:
    event = p.event(
        "e4",
        "sections.updated",
        p.section(p.s2, [p.rivera], []),
        created=T0,
        previous={"teachers": [p.rivera, p.kim], "students": [p.steve]},
    )
    assert send(stack, event) == "done"
    assert p.s2 not in ids(stack.account(p.steve)["classes"])
    assert p.s2 not in ids(stack.account(p.kim)["classes"])
    assert p.s2 in ids(stack.account(p.rivera)["classes"])
    assert p.kim in stack.account(p.steve)["coaches"]  # still coached by Kim through 3a01


def test_districts_deleted_exits_the_whole_district(stack: Stack, p: People) -> None:
    event = p.event("e5", "districts.deleted", {"id": p.district, "name": "x"}, created=T0)
    assert send(stack, event) == "done"
    stack.wait_idle()
    assert stack.cli_json("status", "--json")["pending"] == 0
    for person in (p.pat, p.rivera, p.kim, p.steve, p.maria, p.leo):
        view = stack.account(person)
        assert view["kind"] == "grassroots" and view["district"] is None
        assert not any(c["district_synced"] for c in view["classes"])
    assert stack.account(p.pat)["roles"] == ["teacher"]
    progress = stack.ops("GET", f"/ops/districts/{p.district}/exit").json()
    assert progress["status"] == "done" and progress["units_done"] == progress["units_total"] > 0


def test_district_exit_from_the_cli_runs_through_the_workers_and_waits(
    stack: Stack, p: People
) -> None:
    done = stack.cli("district", "exit", p.district, "--wait")
    assert f"district {p.district}: exit started" in done.stdout
    progress = stack.ops("GET", f"/ops/districts/{p.district}/exit").json()
    assert progress["status"] == "done" and progress["units_done"] == progress["units_total"] > 0
    for person in (p.pat, p.rivera, p.kim, p.steve, p.maria, p.leo):
        view = stack.account(person)
        assert view["kind"] == "grassroots" and view["district"] is None
    unknown = stack.cli("district", "exit", p.copy("0" * 24), check=False)
    assert unknown.returncode != 0 and "no district" in unknown.stderr

    # Once restored, a second exit is waited for, not mistaken for the first one (done).
    stack.cli("restore", p.district)
    assert stack.account(p.steve)["kind"] == "district"
    undone = stack.ops("GET", f"/ops/districts/{p.district}/exit").json()
    assert undone == {**progress, "status": "restored"}
    first = progress["exit"]
    stack.cli("district", "exit", p.district, "--wait")
    again = stack.ops("GET", f"/ops/districts/{p.district}/exit").json()
    assert again["exit"] > first and again["status"] == "done"
    for person in (p.pat, p.rivera, p.kim, p.steve, p.maria, p.leo):
        assert stack.account(person)["kind"] == "grassroots"
    # An exit asked for again once done: nothing new to wait for.
    repeat = stack.cli("district", "exit", p.district, "--wait")
    assert "exited in" in repeat.stdout
    assert stack.ops("GET", f"/ops/districts/{p.district}/exit").json()["exit"] == again["exit"]


def test_users_created_for_a_converted_account_restores_it(stack: Stack, p: People) -> None:
    before = stack.account(p.steve)
    send(stack, p.event("e6", "users.deleted", p.user(p.steve, {"student": {}}), created=T0))
    assert stack.account(p.steve)["kind"] == "grassroots"
    assert (
        send(
            stack,
            p.event(
                "e7",
                "users.created",
                p.user(p.steve, {"student": {}}),
                created="2026-10-02T00:00:00Z",
            ),
        )
        == "done"
    )
    assert stack.account(p.steve) == before


def test_roster_growth_is_mirrored_so_later_removals_see_it(stack: Stack, p: People) -> None:
    newbie = p.copy("58c81dcea36279271500aaaa")
    send(
        stack,
        p.event("e8", "users.created", p.user(newbie, {"student": {}}, email=None), created=T0),
    )
    grown = p.section(p.s3, [p.rivera], [p.maria, p.leo, newbie])
    assert (
        send(
            stack,
            p.event(
                "e9",
                "sections.updated",
                grown,
                created="2026-10-02T00:00:00Z",
                previous={"students": [p.maria, p.leo]},
            ),
        )
        == "done"
    )
    assert ids(stack.account(newbie)["classes"]) == [p.s3]
    new_section = p.section(p.copy("60a1b2c3d4e5f60718293a09"), [p.kim], [newbie])
    assert (
        send(stack, p.event("e10", "sections.created", new_section, created="2026-10-03T00:00:00Z"))
        == "done"
    )
    assert ids(stack.account(newbie)["classes"]) == sorted([p.s3, new_section["id"]])
    assert (
        send(
            stack,
            p.event("e11", "districts.deleted", {"id": p.district}, created="2026-10-04T00:00:00Z"),
        )
        == "done"
    )
    stack.wait_idle()
    newbie_view = stack.account(newbie)
    assert newbie_view["kind"] == "grassroots" and newbie_view["classes"] == []


def test_unknown_ids_and_types_are_ignored_with_a_reason(stack: Stack, p: People) -> None:
    stranger = p.event(
        "e12", "users.deleted", p.user(p.copy("0" * 24), {"student": {}}), created=T0
    )
    assert send(stack, stranger) == "ignored"
    assert stack.event(stranger["id"])["error"] == "unknown user"
    assert send(stack, p.event("e13", "schools.updated", {"id": "s1"}, created=T0)) == "ignored"


def test_duplicates_sequential_and_concurrent_give_one_row_and_one_effect(
    stack: Stack, p: People
) -> None:
    event = p.event("dup-1", "users.deleted", p.user(p.steve, {"student": {}}), created=T0)
    assert stack.post(event).json()["status"] == "accepted"
    assert stack.post(event).json() == {"event": event["id"], "status": "duplicate"}
    concurrent_event = p.event("dup-2", "users.deleted", p.user(p.leo, {"student": {}}), created=T0)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: stack.post(concurrent_event), range(20)))
    assert all(a.status_code == 202 for a in answers)
    assert sorted(a.json()["status"] for a in answers) == ["accepted"] + ["duplicate"] * 19
    stack.wait_idle()
    listed = [
        e
        for e in stack.cli_json("events", "list", "--json")
        if e["id"] in (event["id"], concurrent_event["id"])
    ]
    assert sorted(e["id"] for e in listed) == [event["id"], concurrent_event["id"]]
    assert all(e["status"] == "done" and e["attempts"] == 1 for e in listed)
    journal = stack.ops("GET", f"/ops/accounts/{p.leo}").json()
    assert journal["kind"] == "grassroots"


def test_an_event_older_than_the_last_applied_one_is_stale(stack: Stack, p: People) -> None:
    newer = p.event(
        "o-2",
        "users.updated",
        p.user(p.rivera, {"teacher": {}}),
        created="2026-10-02T00:00:00Z",
        previous={"roles": {"teacher": {}, "district_admin": {}}},
    )
    older = p.event("o-1", "users.deleted", p.user(p.rivera, {"teacher": {}}), created=T0)
    assert send(stack, newer) == "done"
    assert send(stack, older) == "stale"
    assert stack.account(p.rivera)["kind"] == "district"


def test_brake_holds_mass_removal_until_released(tmp_path: Path, pg_databases: PgDatabases) -> None:
    with running_stack(tmp_path, pg_databases.new(), REMOVAL_BRAKE_PERCENT="10") as stack:
        p = People(stack, Copy("b000"))
        first = p.event("b-1", "users.deleted", p.user(p.steve, {"student": {}}), created=T0)
        second = p.event(
            "b-2", "users.deleted", p.user(p.maria, {"student": {}}), created="2026-10-01T00:00:01Z"
        )
        assert send(stack, first) == "done"  # one of seven is within the allowance
        assert send(stack, second) == "held"
        assert stack.account(p.maria)["kind"] == "district"
        held = stack.cli_json("held", "list", "--json")
        assert held == [
            {
                "id": second["id"],
                "type": "users.deleted",
                "account": p.maria,
                "district": p.district,
            }
        ]
        stack.cli("held", "release", second["id"])
        wait_until(lambda: stack.event(second["id"])["status"] == "done", what="release")
        assert stack.account(p.maria)["kind"] == "grassroots"
        assert stack.cli_json("held", "list", "--json") == []


def test_logs_are_json_lines_with_ids_bound_and_no_personal_data(stack: Stack, p: People) -> None:
    event = p.event("log-1", "users.deleted", p.user(p.maria, {"student": {}}), created=T0)
    assert send(stack, event) == "done"
    lines = [json.loads(line) for line in stack.log("worker0").splitlines() if line.startswith("{")]
    applied = [r for r in lines if r.get("event_id") == event["id"] and r["msg"] == "event done"]
    assert applied and applied[0]["account_id"] == p.maria
    assert applied[0]["task"] == "grassroots.process_event" and applied[0]["level"] == "info"
    people = p.copy.data["users"]
    text = stack.log("worker0") + stack.log("serve")
    for person in people:
        assert person["email"] is None or person["email"] not in text
        assert person["name"]["last"] not in text


def test_metrics_report_events_conversions_and_queues(stack: Stack, p: People) -> None:
    event = p.event("m-1", "users.deleted", p.user(p.leo, {"student": {}}), created=T0)
    assert send(stack, event) == "done"
    assert httpx.get(f"{stack.base}/metrics", timeout=10).status_code == 401
    text = stack.ops("GET", "/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['grassroots_events_last_24h{status="done",type="users.deleted"}'] >= 1
    assert "# TYPE grassroots_events_last_24h gauge" in text.splitlines()
    assert samples['grassroots_conversions_last_24h{outcome="converted",role="student"}'] >= 1
    for queue in ("events", "conversions", "fanout", "maintenance"):
        assert f'grassroots_queue_depth_messages{{queue="{queue}"}}' in samples
    assert samples['grassroots_up{dependency="database"}'] == 1
    assert samples['grassroots_up{dependency="broker"}'] == 1
    assert "grassroots_dead_letters" in samples and "grassroots_held_removals" in samples
