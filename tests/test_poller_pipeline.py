"""What the poller feeds, SPEC §5.3: two pollers, or a poller and a webhook, at once store and send
each event once; the district mirror follows the feed; and end to end, ``grassroots poll`` feeding
a real receiver's inbox and real workers, through to the district's exit.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from models import AuditRecord
from tasks import events as routing
from tasks import exits
from tasks.inbox import ingest
from tasks.roster import load_snapshot
from tasks.view import account_view
from tests.support import scenario
from tests.support.databases import PgDatabases
from tests.support.fake_clever import FakeClever
from tests.support.poller import FAST, Db, Ids, Poller
from tests.support.stack import Stack, clever_event, running_stack, wait_until
from worker.celery_app import app as celery_app
from worker.clever import DistrictToken
from worker.db import make_engine, session_scope
from worker.jobs import process_event
from worker.poller import PollResult, poll_district

# --------------------------------------------------------------------------------------------
# Concurrency: two pollers, or a poller and a webhook, at once


class Collector:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, event_ids: Any) -> None:
        with self._lock:
            self.sent.extend(event_ids)


def test_two_pollers_on_one_district_store_and_send_each_event_once(
    db: Db, ids: Ids, clever: FakeClever
) -> None:
    options = replace(FAST, base_url=clever.url)
    token = DistrictToken(ids.district(), ids.token())
    poll_district(db.session, token, options=options, enqueue=list)
    clever.add(ids.district(), *(ids.event(n) for n in range(1, 21)))
    collect = Collector()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(
                lambda _: poll_district(db.session, token, options=options, enqueue=collect),
                range(2),
            )
        )

    assert {r.outcome for r in results} <= {"polled", "raced"}
    assert Counter(collect.sent) == Counter(ids.eids(range(1, 21)))
    assert db.cursor(ids.district()).cursor == ids.eid(20)


def test_the_same_events_from_webhook_and_poller_at_once_are_stored_and_sent_once(
    db: Db, ids: Ids, clever: FakeClever
) -> None:
    options = replace(FAST, base_url=clever.url)
    token = DistrictToken(ids.district(), ids.token())
    poll_district(db.session, token, options=options, enqueue=list)
    feed = [ids.event(n) for n in range(1, 31)]
    clever.add(ids.district(), *feed)
    collect = Collector()
    start = threading.Barrier(2)

    def webhooks() -> None:
        start.wait()
        for raw in feed:
            with db.session() as s:
                stored = ingest(s, raw, source="webhook")
            if stored.new:  # what the receiver does: enqueue only a new event
                collect([stored.event_id])

    def poller() -> PollResult:
        start.wait()
        return poll_district(db.session, token, options=options, enqueue=collect)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        hooks, polled = pool.submit(webhooks), pool.submit(poller)
        hooks.result()
        assert polled.result().outcome == "polled"

    assert Counter(collect.sent) == Counter(ids.eids(range(1, 31)))
    assert db.inbox(ids.district()) == ids.eids(range(1, 31))


# --------------------------------------------------------------------------------------------
# The district mirror follows the feed


def _apply(db: Db, event_ids: list[str]) -> list[str]:
    """What the workers do with the sent events, in order, in-process."""
    statuses: list[str] = []
    for event_id in event_ids:
        with db.session() as s:
            routed = routing.process_event(s, event_id, routing.Limits(brake_percent=100))
        assert routed is not None
        statuses.append(routed.status)
        if routed.exit_plan is not None:
            exit_id = routed.exit_plan.exit_id
            with db.session() as s:
                # Phase by phase (teachers, then account batches), as the workers are sent them.
                while pending := exits.pending_units(s, exit_id):
                    for key, _ in pending:
                        exits.run_unit(s, exit_id, key)
                exits.finish(s, exit_id)
    return statuses


def _district_classes(view: dict[str, Any]) -> list[str]:
    return [c["id"] for c in view["classes"] if c["district_synced"]]


@dataclass(frozen=True)
class Growth:
    """A newcomer to a district, then added to one of its sections, then the district leaves."""

    copy: scenario.Copy
    ids: Ids

    @property
    def district(self) -> str:
        return self.copy(scenario.DISTRICT)

    @property
    def newcomer(self) -> str:
        return self.ids.tag + "5eed" * 5

    @property
    def section(self) -> str:
        return self.copy(scenario.S3)

    def user_created(self) -> dict[str, Any]:
        user = {"id": self.newcomer, "district": self.district, "roles": {"student": {}}}
        return clever_event(self.ids.eid(1), "users.created", user, created="2026-10-02T08:00:00Z")

    def section_grew(self) -> dict[str, Any]:
        students = [self.copy(scenario.MARIA), self.copy(scenario.LEO)]
        rivera = self.copy(scenario.RIVERA)
        section = {
            "id": self.section,
            "district": self.district,
            "name": "Grade 5 Science",
            "teacher": rivera,
            "teachers": [rivera],
            "students": [*students, self.newcomer],
        }
        return clever_event(
            self.ids.eid(2),
            "sections.updated",
            section,
            created="2026-10-02T08:00:01Z",
            previous={"students": students},
        )

    def district_left(self) -> dict[str, Any]:
        district = {"id": self.district, "name": "Example ISD"}
        return clever_event(
            self.ids.eid(3), "districts.deleted", district, created="2026-10-03T08:00:00Z"
        )


def test_a_student_added_through_the_feed_is_converted_when_the_district_leaves(
    db: Db, ids: Ids, clever: FakeClever, poll: Poller
) -> None:
    growth = Growth(scenario.Copy(ids.tag), ids)
    clever.district(growth.district, ids.token(9))
    with db.session() as s:
        load_snapshot(s, growth.copy.data)
    poll(district=growth.district, token=ids.token(9))
    clever.add(growth.district, growth.user_created(), growth.section_grew())

    poll(district=growth.district, token=ids.token(9))
    assert _apply(db, poll.sent) == ["done", "done"]
    with db.session() as s:
        assert _district_classes(account_view(s, growth.newcomer)) == [growth.section]

    clever.add(growth.district, growth.district_left())
    poll(district=growth.district, token=ids.token(9))
    assert _apply(db, poll.sent[2:]) == ["done"]
    with db.session() as s:
        view = account_view(s, growth.newcomer)
    assert (view["kind"], view["district"], _district_classes(view)) == ("grassroots", None, [])


# --------------------------------------------------------------------------------------------
# End to end: `grassroots poll` feeding a real receiver's inbox and real workers


@pytest.fixture(scope="module")
def e2e(
    tmp_path_factory: pytest.TempPathFactory, pg_databases: PgDatabases
) -> Iterator[tuple[Stack, FakeClever]]:
    with (
        FakeClever() as fake,
        running_stack(tmp_path_factory.mktemp("poll-stack"), pg_databases.new()) as stack,
    ):
        yield stack, fake


def _seed(stack: Stack, copy: scenario.Copy) -> None:
    path = stack.tmp / f"roster-{copy.tag}.json"
    path.write_text(json.dumps(copy.data))
    stack.cli("seed", str(path))


@dataclass
class StackPoller:
    """A poller in this process feeding the stack's inbox and broker, as `grassroots poll` in
    the stack would (the command itself runs in the crash tests, test_poller_processes.py)."""

    stack: Stack
    fake: FakeClever
    token: DistrictToken

    def enqueue(self, event_ids: Any) -> None:
        with celery_app.connection_for_write(self.stack.redis.url) as conn:
            producer = conn.Producer()
            for event_id in event_ids:
                process_event.apply_async((event_id,), producer=producer)

    def __call__(self) -> PollResult:
        engine = make_engine(self.stack.database_url)
        try:
            return poll_district(
                lambda: session_scope(engine),
                self.token,
                options=replace(FAST, base_url=self.fake.url),
                enqueue=self.enqueue,
            )
        finally:
            engine.dispose()


def _finished(stack: Stack, event_id: str) -> str:
    def final() -> str:
        status = str(stack.event(event_id)["status"])
        return "" if status in ("accepted", "processing") else status

    return wait_until(final, what=f"event {event_id} to finish")


@pytest.mark.slow
def test_polled_roster_growth_reaches_the_workers_and_is_converted_at_district_exit(
    e2e: tuple[Stack, FakeClever], ids: Ids
) -> None:
    stack, fake = e2e
    growth = Growth(scenario.Copy(ids.tag), ids)
    _seed(stack, growth.copy)
    district = growth.district
    fake.district(district, ids.token())
    poll = StackPoller(stack, fake, DistrictToken(district, ids.token()))
    fake.add(district, ids.event(0))  # history before the first pass: never read
    assert poll().outcome == "started"

    # One event per pass: concurrent workers could otherwise apply the section's growth before
    # the newcomer exists (see the report on event ordering across objects).
    for event in (growth.user_created(), growth.section_grew()):
        fake.add(district, event)
        assert poll().new == 1
        assert _finished(stack, event["id"]) == "done"
    assert _district_classes(stack.account(growth.newcomer)) == [growth.section]

    fake.add(district, growth.district_left())
    assert poll().new == 1
    stack.wait_idle()

    view = stack.account(growth.newcomer)
    assert (view["kind"], view["district"], _district_classes(view)) == ("grassroots", None, [])
    assert stack.ops("GET", f"/ops/events/{ids.eid(0)}").status_code == 404  # history unread


@pytest.mark.slow
def test_an_event_delivered_by_webhook_and_poller_at_once_is_applied_once(
    e2e: tuple[Stack, FakeClever], ids: Ids
) -> None:
    stack, fake = e2e
    copy = scenario.Copy(ids.tag)
    _seed(stack, copy)
    district, leo = copy(scenario.DISTRICT), copy(scenario.LEO)
    fake.district(district, ids.token())
    poll = StackPoller(stack, fake, DistrictToken(district, ids.token()))
    assert poll().outcome == "started"
    deleted = clever_event(
        ids.eid(1),
        "users.deleted",
        {"id": leo, "district": district, "roles": {"student": {}}},
        created="2026-10-02T08:00:00Z",
    )
    fake.add(district, deleted)

    start = threading.Barrier(2)

    def webhook() -> httpx.Response:
        start.wait()
        return stack.post(deleted)

    def poller() -> PollResult:
        start.wait()
        return poll()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        hook, polled = pool.submit(webhook), pool.submit(poller)
        response, result = hook.result(), polled.result()

    assert response.status_code == 202
    by_webhook = response.json()["status"] == "accepted"
    assert by_webhook != (result.new == 1)  # exactly one of them stored it
    assert _finished(stack, ids.eid(1)) == "done"
    stack.wait_idle()
    assert stack.account(leo)["kind"] == "grassroots"
    engine = make_engine(stack.database_url)
    try:
        with session_scope(engine) as s:
            actions = Counter(
                s.scalars(
                    select(AuditRecord.action).where(
                        AuditRecord.trigger == f"event:users.deleted:{ids.eid(1)}"
                    )
                )
            )
    finally:
        engine.dispose()
    assert actions == {"apply_event": 1, "convert": 1}
