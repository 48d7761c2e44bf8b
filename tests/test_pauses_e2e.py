"""Roster pauses end to end (SPEC §4 "Pauses"): signed webhooks to a real receiver, a real Redis,
a real ``grassroots worker`` and ``grassroots beat``, a real Postgres; pauses added and removed
through the CLI and the ops API."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from models import Pause, utcnow
from tests.support import scenario
from tests.support.databases import PgDatabases
from tests.support.scenario import Copy, ids
from tests.support.stack import OPS_TOKEN, Stack, clever_event, running_stack, wait_until
from worker.db import make_engine

pytestmark = pytest.mark.slow

_tags = (f"{n:04x}" for n in itertools.count(0xD000))
# Clever times of changes made before the tests run: a `created` ahead of our clock is rejected.
T1, T2, T3 = "2026-10-20T10:00:00Z", "2026-10-22T10:00:00Z", "2026-11-03T10:00:00Z"
FAR = "2099-01-05"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_databases: PgDatabases) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("pause-stack"), pg_databases.new(), workers=0, beat=True
    ) as s:
        # One pool process: the worker takes the events in the order they were sent, so the
        # order a release sends them in is the order they are applied in.
        s.start_worker("worker0", concurrency=1)
        yield s


class People:
    """One test's own copy of the example district, seeded into the shared stack."""

    def __init__(self, stack: Stack) -> None:
        self.copy = c = Copy(next(_tags))
        path = stack.tmp / f"roster-{c.tag}.json"
        path.write_text(json.dumps(c.data))
        stack.cli("seed", str(path))
        self.district = c(scenario.DISTRICT)
        self.rivera, self.kim = c(scenario.RIVERA), c(scenario.KIM)
        self.steve, self.maria, self.leo = c(scenario.STEVE), c(scenario.MARIA), c(scenario.LEO)
        self.s1, self.s3 = c(scenario.S1), c(scenario.S3)
        self.everyone = [c(p) for p in scenario.PEOPLE if p != scenario.SAM]

    def user(self, uid: str, roles: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = next((u for u in self.copy.data["users"] if u["id"] == uid), {})
        return {**found, "id": uid, "district": self.district, "roles": roles}

    def section(self, sid: str, teachers: list[str], students: list[str]) -> dict[str, Any]:
        listed = next(s for s in self.copy.data["sections"] if s["id"] == sid)
        return {**listed, "teacher": teachers[0], "teachers": teachers, "students": students}

    def event(self, name: str, type_: str, obj: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return clever_event(f"{self.copy.tag}-{name}", type_, obj, **kw)


@pytest.fixture
def p(stack: Stack) -> People:
    return People(stack)


def send(stack: Stack, event: dict[str, Any]) -> str:
    """Post the event; the status a worker gave it."""
    response = stack.post(event)
    assert response.status_code == 202, response.text
    return settled(stack, event["id"])


def settled(stack: Stack, event_id: str, timeout: float = 60, *, released: bool = False) -> str:
    """The event's status once a worker is done with it (``released``: once it is no longer
    deferred either)."""
    waiting = {"accepted", "processing", *(["deferred"] if released else [])}

    def finished() -> str | None:
        status: str = stack.event(event_id)["status"]
        return None if status in waiting else status

    return wait_until(finished, timeout=timeout, what=f"event {event_id} to settle") or ""


def add_pause(stack: Stack, *args: str) -> dict[str, Any]:
    made: dict[str, Any] = stack.cli_json("pause", "add", "--until", FAR, "--json", *args)
    return made


def listed(stack: Stack, pause_id: int) -> dict[str, Any]:
    found: dict[str, Any] = next(
        r for r in stack.cli_json("pause", "list", "--json") if r["id"] == pause_id
    )
    return found


def test_removals_wait_through_a_pause_and_apply_in_clever_order_when_it_ends(
    stack: Stack, p: People
) -> None:
    pause = add_pause(stack, "--district", p.district, "--reason", "winter break")
    # Sent newest first: Rivera leaves (T2) after losing the admin role (T1).
    leaves = p.event("leaves", "users.deleted", p.user(p.rivera, {"teacher": {}}), created=T2)
    demoted = p.event(
        "demoted",
        "users.updated",
        p.user(p.rivera, {"teacher": {}}),
        created=T1,
        previous={"roles": {"teacher": {}, "district_admin": {}}},
    )
    shrunk = p.event(
        "shrunk",
        "sections.updated",
        p.section(p.s3, [p.rivera], [p.maria]),
        created=T1,
        previous={"students": [p.maria, p.leo]},
    )
    before = {who: stack.account(who) for who in p.everyone}
    for event in (leaves, demoted, shrunk):
        assert send(stack, event) == "deferred"
        assert f"deferred by pause {pause['id']}" in stack.event(event["id"])["error"]
    assert {who: stack.account(who) for who in p.everyone} == before
    assert listed(stack, pause["id"])["deferred"] == 3
    assert stack.wait_idle()["pending"] == 0  # deferred events are not pending work

    # The pause's end comes, as if its end had been reached: beat's release runs on its own.
    engine = make_engine(stack.database_url)
    with Session(engine) as session, session.begin():
        now = utcnow()
        session.execute(
            update(Pause)
            .where(Pause.id == pause["id"])
            .values(starts_at=now - timedelta(hours=1), ends_at=now)
        )
    engine.dispose()

    # Within a minute of its end (beat's pass every 30 s), oldest Clever change first.
    assert settled(stack, demoted["id"], 90, released=True) == "done"
    assert settled(stack, leaves["id"], released=True) == "done"
    assert settled(stack, shrunk["id"], released=True) == "done"
    rivera = stack.account(p.rivera)
    assert rivera["kind"] == "grassroots" and not any(
        c["district_synced"] for c in rivera["classes"]
    )
    assert p.s3 not in ids(stack.account(p.leo)["classes"])
    assert all(r["id"] != pause["id"] for r in stack.cli_json("pause", "list", "--json"))


def test_someone_who_left_and_came_back_during_a_pause_keeps_everything(
    stack: Stack, p: People
) -> None:
    before = {who: stack.account(who) for who in p.everyone}
    pause = add_pause(stack, "--district", p.district)
    left = p.event("left", "users.deleted", p.user(p.steve, {"student": {}}), created=T1)
    dropped = p.event(
        "dropped",
        "sections.updated",
        p.section(p.s1, [p.kim], [p.maria]),
        created=T1,
        previous={"students": [p.steve, p.maria]},
    )
    assert send(stack, left) == "deferred" and send(stack, dropped) == "deferred"
    back = p.event("back", "users.created", p.user(p.steve, {"student": {}}), created=T3)
    readded = p.event(
        "readded",
        "sections.updated",
        p.section(p.s1, [p.kim], [p.steve, p.maria]),
        created=T3,
        previous={"students": [p.maria]},
    )
    assert send(stack, back) == "done" and send(stack, readded) == "done"

    # Removed early: what it held is released at once, and the fence finds it out of date.
    removed = stack.cli("pause", "remove", str(pause["id"]))
    assert f"pause {pause['id']} removed; 2 deferred event(s) released" in removed.stdout
    assert settled(stack, left["id"], released=True) == "stale"
    assert settled(stack, dropped["id"], released=True) == "stale"
    assert {who: stack.account(who) for who in p.everyone} == before


def test_a_district_exit_goes_through_a_pause_of_every_district(stack: Stack, p: People) -> None:
    headers = {"authorization": f"Bearer {OPS_TOKEN}"}
    made = httpx.post(
        f"{stack.base}/ops/pauses",
        json={"district": None, "until": FAR, "reason": "summer"},
        headers=headers,
        timeout=30,
    )
    assert made.status_code == 201, made.text
    pause = made.json()
    try:
        left = p.event("left", "users.deleted", p.user(p.steve, {"student": {}}), created=T1)
        assert send(stack, left) == "deferred"
        gone = p.event("gone", "districts.deleted", {"id": p.district, "name": "x"}, created=T2)
        assert send(stack, gone) == "done"
        stack.wait_idle()
        progress = stack.ops("GET", f"/ops/districts/{p.district}/exit").json()
        assert progress["status"] == "done"
        for who in p.everyone:
            view = stack.account(who)
            assert view["kind"] == "grassroots" and view["district"] is None
        assert stack.event(left["id"])["status"] == "deferred"
    finally:
        removed = httpx.delete(f"{stack.base}/ops/pauses/{pause['id']}", headers=headers)
    assert removed.status_code == 200 and removed.json()["released"] == 1
    # Released after the exit: its account has left with the district already.
    assert settled(stack, left["id"], released=True) == "ignored"
