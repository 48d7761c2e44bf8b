"""The Clever Events API poller, SPEC §5.3, against a local Clever-shaped server.

Every test reads back what the inbox and the cursor table hold after real passes over HTTP; the
crash tests kill a real ``grassroots poll`` process from outside and check that nothing was lost
and nothing was sent to the workers twice. Passes commit, so the tests share one database per
backend for the module, each test with its own districts and event ids.
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner, Result
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from models import AuditRecord, PollCursor, RosterEvent
from tasks import events as routing
from tasks import exits
from tasks.inbox import ingest, previous_attributes
from tasks.roster import load_snapshot
from tasks.view import account_view
from tests.support import scenario
from tests.support.databases import PgDatabases, fresh_sqlite
from tests.support.fake_clever import FakeClever, Scripted
from tests.support.stack import RedisServer, Stack, clever_event, running_stack, wait_until
from worker import db as worker_db
from worker.celery_app import app as celery_app
from worker.clever import DistrictToken, RateLimiter, parse_tokens
from worker.cli.poll import poll as poll_command
from worker.db import make_engine, session_scope
from worker.jobs import poll as poll_task
from worker.jobs import process_event
from worker.names import ROUTES
from worker.poller import PollOptions, PollResult, poll_all, poll_district, reset_district
from worker.settings import ConfigError, get_settings

FAST = PollOptions(
    page_size=2, attempts=4, backoff=0.01, backoff_max=0.05, timeout=httpx.Timeout(2.0)
)
_tags = (f"{n:04x}" for n in itertools.count(0xC000))


@dataclass(frozen=True)
class Ids:
    """One test's own districts, tokens and events (Clever-looking 24-character ids)."""

    tag: str

    def district(self, k: int = 0) -> str:
        return f"{self.tag}{k:04x}" + "d157" * 4

    def token(self, k: int = 0) -> str:
        return f"tok-{self.tag}-{k}-9f3ac1e2"

    def eid(self, n: int) -> str:
        return f"{self.tag}{n:04x}" + "e" * 16

    def event(self, n: int, k: int = 0) -> dict[str, Any]:
        """A users.updated event of district ``k``, ``created`` in feed order."""
        return clever_event(
            self.eid(n),
            "users.updated",
            {"id": f"{self.tag}{n:04x}" + "a" * 16, "district": self.district(k), "roles": {}},
            created=f"2026-10-01T00:{n // 60:02d}:{n % 60:02d}Z",
        )

    def eids(self, numbers: Iterable[int]) -> list[str]:
        return [self.eid(n) for n in numbers]


@dataclass
class Db:
    engine: Engine
    url: str

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.engine)

    def inbox(self, *districts: str) -> list[str]:
        with self.session() as s:
            return sorted(
                s.scalars(select(RosterEvent.id).where(RosterEvent.district_id.in_(districts)))
            )

    def payload(self, event_id: str) -> dict[str, Any]:
        with self.session() as s:
            stored = s.get(RosterEvent, event_id)
            assert stored is not None
            return stored.payload

    def cursor(self, district: str) -> PollCursor:
        with self.session() as s:
            row = s.get(PollCursor, district)
            assert row is not None
            return row


@pytest.fixture(scope="module")
def postgresql_db(pg_databases: PgDatabases) -> Iterator[Db]:
    url = pg_databases.new()
    engine = make_engine(url)
    yield Db(engine, url)
    engine.dispose()


@pytest.fixture(scope="module")
def sqlite_db(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    url = fresh_sqlite(sqlite_template, tmp_path_factory.mktemp("poller"))
    engine = make_engine(url)
    yield Db(engine, url)
    engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest) -> Db:
    chosen: Db = request.getfixturevalue(f"{request.param}_db")
    return chosen


@pytest.fixture
def ids() -> Ids:
    return Ids(next(_tags))


@pytest.fixture
def clever(ids: Ids) -> Iterator[FakeClever]:
    with FakeClever() as server:
        server.district(ids.district(), ids.token())
        yield server


@dataclass
class Poller:
    """``poll_district`` against the fake, collecting what it sends to the workers."""

    db: Db
    ids: Ids
    options: PollOptions
    sent: list[str] = field(default_factory=list)

    def enqueue(self, event_ids: Any) -> int:
        self.sent.extend(event_ids)
        return len(event_ids)

    def __call__(
        self, k: int = 0, *, district: str | None = None, token: str | None = None, **kw: Any
    ) -> PollResult:
        district = district or self.ids.district(k)
        return poll_district(
            self.db.session,
            DistrictToken(district, token or self.ids.token(k)),
            options=self.options,
            enqueue=self.enqueue,
            **kw,
        )


@pytest.fixture
def poll(db: Db, ids: Ids, clever: FakeClever) -> Poller:
    return Poller(db, ids, replace(FAST, base_url=clever.url))


def after(clever: FakeClever, district: str) -> list[str | None]:
    """What each request of the district asked to start after (None: from the start)."""
    return [r.query.get("starting_after") for r in clever.requests(district)]


# --------------------------------------------------------------------------------------------
# Reading the feed


def test_first_pass_starts_after_the_newest_event_without_ingesting_history(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    d = ids.district()
    clever.add(d, ids.event(1), ids.event(2), ids.event(3))

    first = poll()

    assert (first.outcome, first.cursor, first.new) == ("started", ids.eid(3), 0)
    assert clever.requests(d)[0].query == {"ending_before": "last", "limit": "1"}
    assert db.inbox(d) == [] and poll.sent == []
    clever.add(d, ids.event(4), ids.event(5))
    second = poll()
    assert (second.outcome, second.new, second.cursor) == ("polled", 2, ids.eid(5))
    assert db.inbox(d) == poll.sent == ids.eids(range(4, 6))
    assert db.cursor(d).cursor == ids.eid(5)


def test_first_pass_on_an_empty_feed_reads_later_events_from_the_start(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    assert poll().outcome == "started"
    clever.add(ids.district(), ids.event(1))

    assert poll().new == 1
    assert db.inbox(ids.district()) == [ids.eid(1)]


@pytest.mark.parametrize("wrap", [True, False], ids=["wrapped", "bare"])
def test_pages_are_followed_along_next_links_until_an_empty_page(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids, wrap: bool
) -> None:
    d = ids.district()
    clever.wrap = wrap
    poll()
    clever.add(d, *(ids.event(n) for n in range(1, 6)))

    result = poll()

    assert (result.pages, result.events, result.new) == (3, 5, 5)
    assert after(clever, d)[1:] == [None, ids.eid(2), ids.eid(4), ids.eid(5)]
    assert clever.requests(d)[-1].status == 200  # the empty page ended the pass
    assert db.inbox(d) == poll.sent == ids.eids(range(1, 6))
    assert db.payload(ids.eid(3)) == ids.event(3)  # stored as Clever sent it, unwrapped


def test_previous_attributes_beside_the_nested_event_are_kept(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    poll()
    prev: dict[str, Any] = {"roles": {"student": {}, "teacher": {}}}
    clever.add_items(
        ids.district(),
        {"data": ids.event(1), "previous_attributes": prev, "uri": "/v3.0/events/1"},
        {"data": {**ids.event(2), "previous_attributes": prev}, "uri": "/v3.0/events/2"},
    )

    poll()

    assert previous_attributes(db.payload(ids.eid(1))) == prev
    assert previous_attributes(db.payload(ids.eid(2))) == prev


def test_from_start_replays_the_window_and_stores_each_event_once(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    clever.add(ids.district(), *(ids.event(n) for n in range(1, 6)))
    poll()  # starts at the newest: history is not read by accident

    replay = poll(from_start=True)
    again = poll(from_start=True)

    assert (replay.pages, replay.new, replay.cursor) == (3, 5, ids.eid(5))
    assert (again.pages, again.new) == (3, 0)
    assert db.inbox(ids.district()) == poll.sent == ids.eids(range(1, 6))


def test_a_replay_that_fails_half_way_resumes_from_its_cursor_not_from_the_newest_event(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    d = ids.district()
    clever.add(d, *(ids.event(n) for n in range(1, 6)))
    clever.script(d, *(Scripted(502, after=ids.eid(2)) for _ in range(FAST.attempts)))

    assert (poll(from_start=True).outcome, db.cursor(d).cursor) == ("failed", ids.eid(2))
    resumed = poll()

    assert (resumed.outcome, resumed.new) == ("polled", 3)
    assert db.inbox(d) == poll.sent == ids.eids(range(1, 6))


def test_a_next_link_to_another_host_is_not_followed(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    poll()
    page = {"data": [ids.event(1)], "links": [{"rel": "next", "uri": "http://elsewhere.test/x"}]}
    clever.script(ids.district(), Scripted(body=page))

    result = poll()

    assert result.outcome == "failed" and "away from CLEVER_API_BASE" in str(result.error)
    assert db.inbox(ids.district()) == [ids.eid(1)]  # the page itself was fine and is kept


# --------------------------------------------------------------------------------------------
# Limits and failures


def test_a_rate_limited_request_waits_until_the_reset_time_then_retries(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    d = ids.district()
    poll()
    clever.add(d, ids.event(1))
    clever.script(d, Scripted(429, reset_in=0.5))

    result = poll()

    limited, retried = clever.requests(d)[1:3]
    assert limited.status == 429 and limited.reset is not None
    assert retried.at >= limited.reset
    assert result.outcome == "polled" and db.inbox(d) == [ids.eid(1)]


def test_server_errors_and_timeouts_are_retried_and_lose_nothing(
    db: Db, ids: Ids, clever: FakeClever
) -> None:
    d = ids.district()
    poll = Poller(db, ids, replace(FAST, base_url=clever.url, timeout=httpx.Timeout(0.5)))
    poll()
    clever.add(d, ids.event(1), ids.event(2), ids.event(3))
    clever.script(d, Scripted(500), Scripted(503), Scripted(delay=2.0, after=ids.eid(2)))

    result = poll()

    assert [r.status for r in clever.requests(d)[1:3]] == [500, 503]
    assert after(clever, d).count(ids.eid(2)) == 2  # the page that timed out was asked again
    assert result.outcome == "polled" and db.inbox(d) == ids.eids(range(1, 4))


def test_a_pass_that_keeps_failing_resumes_from_its_committed_cursor(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    d = ids.district()
    poll()
    clever.add(d, *(ids.event(n) for n in range(1, 6)))
    clever.script(d, *(Scripted(502, after=ids.eid(2)) for _ in range(FAST.attempts)))

    failed = poll()
    assert (failed.outcome, failed.cursor, failed.error) == (
        "failed",
        ids.eid(2),
        "Clever answered 502",
    )
    assert db.inbox(d) == ids.eids(range(1, 3))
    assert db.cursor(d).last_error == "Clever answered 502"

    resumed = poll()
    assert after(clever, d)[-4] == ids.eid(2)
    assert (resumed.outcome, resumed.new) == ("polled", 3)
    assert poll.sent == ids.eids(range(1, 6))


def test_a_page_with_a_number_json_cannot_hold_fails_the_pass_and_stores_nothing_of_it(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    # Python's parser would read NaN; the inbox's JSON column could not store it.
    d = ids.district()
    poll()
    odd = {"data": [{**ids.event(1), "created": float("nan")}], "links": []}
    clever.script(d, *(Scripted(body=odd) for _ in range(FAST.attempts)))

    failed = poll()

    assert failed.outcome == "failed"
    assert "not JSON" in str(failed.error) and "NaN" in str(failed.error)
    assert db.inbox(d) == []


def test_a_token_refused_three_passes_in_a_row_disconnects_the_district_without_logging_it(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids, caplog: pytest.LogCaptureFixture
) -> None:
    d, stale = ids.district(), f"tok-revoked-{ids.tag}-5c2e81f0"
    caplog.set_level(logging.DEBUG)

    outcomes = [poll(token=stale).outcome for _ in range(4)]

    assert outcomes == ["unauthorized", "unauthorized", "disconnected", "skipped"]
    assert len(clever.requests(None)) == 3  # the skipped pass asked nothing
    row = db.cursor(d)
    assert (row.status, row.unauthorized_passes) == ("disconnected", 3)
    assert any(
        r.levelno == logging.ERROR and f"district {d} disconnected" in r.getMessage()
        for r in caplog.records
    )
    assert stale not in caplog.text and stale not in str(row.__dict__)

    assert poll().outcome == "started"  # a new token lifts the disconnection
    assert (db.cursor(d).status, db.cursor(d).unauthorized_passes) == ("ok", 0)


def test_an_operator_reset_polls_a_disconnected_district_again(
    poll: Poller, db: Db, ids: Ids
) -> None:
    for _ in range(3):
        poll(token="tok-revoked")
    assert poll(token="tok-revoked").outcome == "skipped"

    assert reset_district(db.session, ids.district())

    assert poll(token="tok-revoked").outcome == "unauthorized"
    assert db.cursor(ids.district()).status == "ok"


def test_a_cursor_clever_no_longer_knows_marks_the_district_for_resync(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    d = ids.district()
    clever.add(d, ids.event(1))
    poll()
    clever.add(d, ids.event(2), ids.event(3))
    clever.expire(d, 2)  # the cursor fell out of the 30-day window

    lost = poll()
    skipped = poll()

    assert (lost.outcome, lost.cursor) == ("resync_needed", ids.eid(1))
    assert db.cursor(d).status == "resync_needed"
    assert skipped.outcome == "skipped" and len(clever.requests(d)) == 2
    assert db.inbox(d) == []

    reset_district(db.session, d)  # after a full resync from the roster
    restarted = poll()
    assert (restarted.outcome, restarted.cursor) == ("started", ids.eid(3))
    clever.add(d, ids.event(4))
    assert poll().new == 1 and db.inbox(d) == [ids.eid(4)]


def test_one_district_failing_never_stops_the_others(db: Db, ids: Ids, clever: FakeClever) -> None:
    for k in (1, 2):
        clever.district(ids.district(k), ids.token(k))
    tokens = parse_tokens(
        [f"{ids.district(0)}:tok-revoked"] + [f"{ids.district(k)}:{ids.token(k)}" for k in (1, 2)]
    )
    options = replace(FAST, base_url=clever.url)
    sent: list[str] = []
    poll_all(db.session, tokens, options=options, enqueue=sent.extend)
    clever.add(ids.district(1), ids.event(1, k=1))
    clever.add(ids.district(2), ids.event(2, k=2))
    clever.script(ids.district(1), *(Scripted(500) for _ in range(FAST.attempts)))

    results = poll_all(db.session, tokens, options=options, enqueue=sent.extend)

    assert [(r.district_id, r.outcome) for r in results] == [
        (ids.district(0), "unauthorized"),
        (ids.district(1), "failed"),
        (ids.district(2), "polled"),
    ]
    assert db.inbox(*(ids.district(k) for k in range(3))) == sent == [ids.eid(2)]


def test_the_client_side_limiter_allows_at_most_the_limit_in_any_window() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = RateLimiter(3, 60.0, clock=lambda: now[0], sleep=sleep)
    sent_at = []
    for _ in range(7):
        limiter.acquire()
        sent_at.append(now[0])
        now[0] += 1.0

    assert sent_at == [0.0, 1.0, 2.0, 60.0, 61.0, 62.0, 120.0]


def test_district_tokens_are_parsed_without_echoing_a_bad_entry() -> None:
    district, token = Ids("c0de").district(), Ids("c0de").token()
    assert parse_tokens([f" {district}:{token} "]) == [DistrictToken(district, token)]
    assert token not in repr(DistrictToken(district, token))
    with pytest.raises(ConfigError) as bad:
        parse_tokens([f"{district}:{token}", "tok-without-district"])
    assert "entry 2" in str(bad.value) and "tok-without-district" not in str(bad.value)


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
        if routed.exit_id is not None:
            with db.session() as s:
                # Phase by phase (teachers, then account batches), as the workers are sent them.
                while pending := exits.pending_units(s, routed.exit_id):
                    for key, _ in pending:
                        exits.run_unit(s, routed.exit_id, key)
                exits.finish(s, routed.exit_id)
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
# Crashes, from outside: a real `grassroots poll` process killed mid-pass


def _poll_env(db: Db, clever: FakeClever, ids: Ids, broker: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
        "DATABASE_URL": db.url,
        "BROKER_URL": broker,
        "CLEVER_API_BASE": clever.url,
        "CLEVER_DISTRICT_TOKENS": f"{ids.district()}:{ids.token()}",
    }


def _poll_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", "poll", "--page-size", "2", *args]


def _sent_to_workers(broker: RedisServer) -> Counter[str]:
    """Event ids in the broker's ``events`` queue (Celery protocol 2 messages)."""
    client = redis.Redis.from_url(broker.url)
    try:
        messages = [json.loads(raw) for raw in client.lrange("events", 0, -1)]
    finally:
        client.close()
    return Counter(json.loads(base64.b64decode(m["body"]))[0][0] for m in messages)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_poller_killed_mid_page_resumes_from_the_last_committed_page(
    db: Db, ids: Ids, clever: FakeClever, poll: Poller, broker: RedisServer, tmp_path: Path
) -> None:
    d = ids.district()
    poll()
    clever.add(d, *(ids.event(n) for n in range(1, 7)))
    stall = threading.Event()
    clever.script(d, Scripted(stall=stall, after=ids.eid(2)))
    proc = subprocess.Popen(
        _poll_command(),
        env=_poll_env(db, clever, ids, broker.url),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: ids.eid(2) in after(clever, d), timeout=60, what="the stalled page")
        assert db.inbox(d) == ids.eids(range(1, 3)) and db.cursor(d).cursor == ids.eid(2)
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=30)
    stall.set()

    restarted = poll()

    # The restart asked for what follows the last committed page, not for the stalled one again.
    assert after(clever, d)[-3:] == [ids.eid(2), ids.eid(4), ids.eid(6)]
    assert (restarted.outcome, restarted.new) == ("polled", 4)
    assert db.inbox(d) == ids.eids(range(1, 7)) and db.cursor(d).cursor == ids.eid(6)
    sent = _sent_to_workers(broker) + Counter(poll.sent)
    assert sent == Counter(ids.eids(range(1, 7)))
    assert ids.token() not in (out + err).decode()


def test_a_poller_killed_between_storing_a_page_and_committing_it_loses_and_repeats_nothing(
    postgresql_db: Db, ids: Ids, clever: FakeClever, broker: RedisServer, tmp_path: Path
) -> None:
    db, d = postgresql_db, ids.district()
    poll = Poller(db, ids, replace(FAST, base_url=clever.url))
    poll()
    clever.add(d, *(ids.event(n) for n in range(1, 7)))
    # Hold event 4 in an open transaction: the poller stores event 3 of page 2, then waits on
    # event 4 inside its page transaction, where it is killed.
    with db.engine.connect() as holder:
        holding = holder.begin()
        ingest(Session(bind=holder), ids.event(4), source="webhook")
        proc = subprocess.Popen(
            _poll_command(), env=_poll_env(db, clever, ids, broker.url), cwd=tmp_path
        )
        try:
            wait_until(lambda: _blocked(db.engine), timeout=60, what="the poller to block")
            assert db.inbox(d) == ids.eids(range(1, 3)) and db.cursor(d).cursor == ids.eid(2)
        finally:
            proc.kill()
            proc.wait(30)
        # The process is gone; so is its database session, with the uncommitted page.
        with db.engine.connect() as admin:
            admin.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        holding.rollback()
    assert db.inbox(d) == ids.eids(range(1, 3))

    restarted = poll()

    assert (restarted.outcome, restarted.new) == ("polled", 4)
    assert db.inbox(d) == ids.eids(range(1, 7)) and db.cursor(d).cursor == ids.eid(6)
    sent = _sent_to_workers(broker) + Counter(poll.sent)
    assert sent == Counter(ids.eids(range(1, 7)))


def _blocked(engine: Engine) -> bool:
    with engine.connect() as conn:
        waiting = conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


# --------------------------------------------------------------------------------------------
# Command line and task


def _forget_configuration() -> None:
    if worker_db.get_engine.cache_info().currsize:
        worker_db.get_engine().dispose()
    worker_db.get_engine.cache_clear()
    worker_db._sessionmaker.cache_clear()
    get_settings.cache_clear()


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Set this process's environment; settings and the database engine follow it."""

    def apply(**env: str) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        _forget_configuration()

    yield apply
    _forget_configuration()


@pytest.fixture
def invoke(configure: Callable[..., None]) -> Callable[..., Result]:
    """Run ``grassroots poll`` in-process with this environment."""

    def run(*args: str, **env: str) -> Result:
        configure(**env)
        return CliRunner().invoke(poll_command, list(args))

    return run


def test_poll_command_reports_every_district_and_fails_when_one_needs_attention(
    invoke: Callable[..., Result], db: Db, ids: Ids, clever: FakeClever
) -> None:
    clever.add(ids.district(), ids.event(1))
    tokens = f"{ids.district()}:{ids.token()},{ids.district(1)}:tok-revoked"

    result = invoke(
        "--json", DATABASE_URL=db.url, CLEVER_API_BASE=clever.url, CLEVER_DISTRICT_TOKENS=tokens
    )

    assert [(r["district"], r["outcome"], r["cursor"]) for r in json.loads(result.stdout)] == [
        (ids.district(), "started", ids.eid(1)),
        (ids.district(1), "unauthorized", None),
    ]
    assert result.exit_code == 1
    assert result.stderr == (
        f"grassroots: 1 of 2 district(s) need attention: {ids.district(1)} (unauthorized)\n"
    )


def test_poll_command_refuses_a_district_without_a_token(
    invoke: Callable[..., Result], ids: Ids
) -> None:
    configured = f"{ids.district()}:{ids.token()}"

    misuse = invoke("--district", ids.district(1), CLEVER_DISTRICT_TOKENS=configured)
    unset = invoke(CLEVER_DISTRICT_TOKENS="")
    malformed = invoke(CLEVER_DISTRICT_TOKENS=ids.token())

    assert misuse.exit_code == 2 and f"no token for district {ids.district(1)}" in misuse.stderr
    assert unset.exit_code == 1
    assert unset.stderr == "grassroots: CLEVER_DISTRICT_TOKENS names no district to poll\n"
    assert malformed.exit_code == 1 and ids.token() not in malformed.stderr


def test_poll_task_has_a_stable_name_and_polls_the_districts_of_its_environment(
    configure: Callable[..., None], db: Db, ids: Ids, clever: FakeClever
) -> None:
    clever.add(ids.district(), ids.event(1))
    configure(
        DATABASE_URL=db.url,
        CLEVER_API_BASE=clever.url,
        CLEVER_DISTRICT_TOKENS=f"{ids.district()}:{ids.token()}",
    )

    outcomes = poll_task.apply().get()

    assert (poll_task.name, ROUTES[poll_task.name]) == ("grassroots.poll", {"queue": "maintenance"})
    assert outcomes == {ids.district(): "started"}
    assert db.cursor(ids.district()).cursor == ids.eid(1)


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
    the stack would (the command itself runs in the crash tests above)."""

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
