"""Group commit of webhooks (worker/intake.py): concurrent requests share one transaction and one
send to the broker, and still behave exactly as if they had come one after another.

The receiver runs in the test's own event loop (httpx's ASGI transport), against a real Postgres.
To make a batch of known content, a second transaction inserts an event id and holds it
uncommitted: a webhook with that id makes its batch's INSERT wait on the row, while the requests
sent meanwhile queue up for the next batch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
import redis
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from models import RosterEvent
from tasks.inbox import Ingested, inbox_row, store
from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.databases import PgDatabases
from tests.support.scenario import DISTRICT, STEVE
from worker import db, intake
from worker.api import app
from worker.http import MAX_BODY
from worker.intake import InboxWriter
from worker.signing import signed_headers

SECRET = "whsec_" + base64.b64encode(b"grassroots-intake-webhook-secret").decode()
# The machine's Redis, on a database nothing else in the project uses; emptied by each test.
LIVE_BROKER = "redis://127.0.0.1:6379/14"
T = TypeVar("T")


def event(event_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": "users.updated",
        "created": "2025-09-03T14:05:21.900Z",
        "data": {"object": {"id": STEVE, "district": DISTRICT}},
        **fields,
    }


async def post(http: httpx.AsyncClient, sent: dict[str, Any]) -> httpx.Response:
    body = json.dumps(sent).encode()
    headers = {"content-type": "application/json", **signed_headers(SECRET, body)}
    return await http.post("/webhooks/clever", content=body, headers=headers)


def run(scenario: Callable[[httpx.AsyncClient, InboxWriter], Awaitable[T]]) -> T:
    """Run ``scenario`` against the receiver in a fresh event loop; the writer's sends are
    finished before this returns."""

    async def main() -> T:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as http:
            try:
                return await scenario(http, intake.writer())
            finally:
                await intake.drain()

    return asyncio.run(main())


async def until(predicate: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def lock_waiters(url: str) -> list[int]:
    """Backends of this database waiting for a lock: a batch waiting on a held row."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def cut_connection(url: str, pid: int) -> None:
    """The server ends a backend, as a Postgres restart or failover would."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


@contextmanager
def held(url: str, *event_ids: str) -> Iterator[None]:
    """Another transaction inserts these ids and keeps them uncommitted until the block ends,
    then rolls back: a batch holding one of them waits at its INSERT until then."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(
                insert(RosterEvent), [inbox_row(event(e), source="test") for e in event_ids]
            )
            yield
            conn.rollback()
    finally:
        engine.dispose()


def inbox() -> dict[str, str]:
    with db.session_scope() as session:
        return dict(session.execute(select(RosterEvent.id, RosterEvent.status)).tuples().all())


def queued_event_ids() -> list[str]:
    """The event ids of the ``process_event`` messages waiting in the broker."""
    messages = redis.Redis.from_url(LIVE_BROKER).lrange("events", 0, -1)
    ids = []
    for raw in messages:
        message = json.loads(raw)
        assert message["headers"]["task"] == "grassroots.process_event"
        args, _, _ = json.loads(base64.b64decode(message["body"]))
        ids.append(args[0])
    return ids


@pytest.fixture
def pg_url(pg_databases: PgDatabases) -> str:
    return pg_databases.new()


@pytest.fixture
def live_broker() -> Iterator[str]:
    broker = redis.Redis.from_url(LIVE_BROKER)
    broker.flushdb()
    yield LIVE_BROKER
    broker.flushdb()


# --------------------------------------------------------------------------------------------
# One transaction, one send, sequential semantics


async def queued_behind_a_held_batch(
    http: httpx.AsyncClient, writer: InboxWriter, pg_url: str, events: list[dict[str, Any]]
) -> tuple[list[httpx.Response], int]:
    """Post ``events`` while a first batch (the event ``evt-plug``) waits on a row lock, so all of
    them queue behind it. Returns their answers and how many batches were written meanwhile."""
    with held(pg_url, "evt-plug"):
        plug = asyncio.create_task(post(http, event("evt-plug")))
        await until(lambda: lock_waiters(pg_url), "the first batch to wait on the held row")
        before = writer.batches
        sends = [asyncio.create_task(post(http, sent)) for sent in events]
        await until(lambda: writer.waiting == len(events), "every request to queue")
    answers = await asyncio.gather(*sends)
    assert (await plug).json() == {"event": "evt-plug", "status": "accepted"}
    return answers, writer.batches - before


def test_concurrent_webhooks_share_one_commit_and_duplicates_in_it_act_as_if_sequential(
    configure: Configure, pg_url: str, live_broker: str
) -> None:
    configure(DATABASE_URL=pg_url, BROKER_URL=live_broker, WEBHOOK_SECRETS=SECRET)
    odd = {"id": "evt-odd", "type": "users.updated"}  # no data.object: stored rejected
    school = {"id": "evt-school", "type": "schools.updated", "data": {"object": {"id": "s-1"}}}
    fresh = [event(f"evt-{n}") for n in range(10)]
    burst = [*fresh, event("evt-0"), event("evt-0"), event("evt-old"), odd, odd, school]

    async def scenario(http: httpx.AsyncClient, writer: InboxWriter) -> list[httpx.Response]:
        assert (await post(http, event("evt-old"))).json()["status"] == "accepted"
        answers, batches = await queued_behind_a_held_batch(http, writer, pg_url, burst)
        # The held batch, then everything that queued behind it in one more.
        assert batches == 2
        return answers

    answers = run(scenario)

    assert all(a.status_code == 202 for a in answers)
    outcomes = Counter((a.json()["event"], a.json()["status"]) for a in answers)
    assert outcomes == Counter(
        {
            **{(f"evt-{n}", "accepted"): 1 for n in range(10)},
            ("evt-0", "duplicate"): 2,
            ("evt-old", "duplicate"): 1,
            ("evt-odd", "accepted"): 1,
            ("evt-odd", "duplicate"): 1,
            ("evt-school", "accepted"): 1,
        }
    )
    stored = inbox()
    assert stored.pop("evt-odd") == "rejected"
    assert stored.pop("evt-school") == "ignored"
    assert stored == dict.fromkeys(["evt-old", "evt-plug", *(e["id"] for e in fresh)], "accepted")
    # Each new event sent once; no duplicate, nothing rejected or ignored.
    assert Counter(queued_event_ids()) == Counter(list(stored))


def test_events_near_the_size_limit_are_split_so_no_batch_passes_its_byte_budget(
    configure: Configure, pg_url: str
) -> None:
    configure(DATABASE_URL=pg_url, BROKER_URL=CLOSED_BROKER, WEBHOOK_SECRETS=SECRET)
    per_batch = intake.MAX_BATCH_BYTES // MAX_BODY
    big = [event(f"evt-big-{n}", padding="x" * (MAX_BODY - 300)) for n in range(per_batch + 1)]

    async def scenario(http: httpx.AsyncClient, writer: InboxWriter) -> list[httpx.Response]:
        answers, batches = await queued_behind_a_held_batch(http, writer, pg_url, big)
        # The held batch, then the big ones in two: they do not fit in one.
        assert batches == 3
        return answers

    answers = run(scenario)

    assert all(a.json()["status"] == "accepted" for a in answers)
    assert len(inbox()) == len(big) + 1


def test_inbox_store_treats_repeats_within_one_call_as_sequential_duplicates(
    session: Session,
) -> None:
    store(session, [inbox_row(event("evt-old"), source="webhook")])
    odd = {"id": "evt-odd", "type": "users.updated"}
    term = {"id": "evt-term", "type": "terms.deleted"}  # not acted on: ignored, whatever it holds
    rows = [
        inbox_row(raw, source="webhook")
        for raw in (
            event("evt-a"),
            odd,
            event("evt-a"),
            event("evt-old"),
            odd,
            term,
            event("evt-b"),
            term,
        )
    ]

    outcomes = store(session, rows)

    assert outcomes == [
        Ingested("evt-a", True, "accepted"),
        Ingested("evt-odd", True, "rejected"),
        Ingested("evt-a", False, "accepted"),
        Ingested("evt-old", False, "accepted"),
        Ingested("evt-odd", False, "rejected"),
        Ingested("evt-term", True, "ignored"),
        Ingested("evt-b", True, "accepted"),
        Ingested("evt-term", False, "ignored"),
    ]
    stored = dict(session.execute(select(RosterEvent.id, RosterEvent.status)).tuples().all())
    assert stored == {
        "evt-old": "accepted",
        "evt-a": "accepted",
        "evt-odd": "rejected",
        "evt-term": "ignored",
        "evt-b": "accepted",
    }


# --------------------------------------------------------------------------------------------
# Failures


def test_database_lost_mid_batch_answers_503_to_every_request_of_it_and_stores_none(
    configure: Configure, pg_url: str
) -> None:
    configure(DATABASE_URL=pg_url, BROKER_URL=CLOSED_BROKER, WEBHOOK_SECRETS=SECRET)

    async def scenario(http: httpx.AsyncClient, writer: InboxWriter) -> list[httpx.Response]:
        with held(pg_url, "evt-plug", "evt-held"):
            plug = asyncio.create_task(post(http, event("evt-plug")))
            await until(lambda: lock_waiters(pg_url), "the first batch to wait on the held row")
            # evt-held last, so the batch has inserted the others when it waits on it.
            sends = [asyncio.create_task(post(http, event(f"evt-{n}"))) for n in range(3)]
            await until(lambda: writer.waiting == 3, "three requests to queue")
            sends.append(asyncio.create_task(post(http, event("evt-held"))))
            await until(lambda: writer.waiting == 4, "the fourth request to queue")
            (first,) = lock_waiters(pg_url)
            cut_connection(pg_url, first)
            assert (await plug).status_code == 503
            await until(lambda: lock_waiters(pg_url), "the second batch to wait on evt-held")
            (second,) = lock_waiters(pg_url)
            cut_connection(pg_url, second)
            answers = await asyncio.gather(*sends)
        # The receiver recovers once the database answers again.
        again = await post(http, event("evt-0"))
        assert again.json() == {"event": "evt-0", "status": "accepted"}
        return answers

    answers = run(scenario)

    for answer in answers:
        assert answer.status_code == 503
        assert answer.json()["error"] == "database_unavailable"
    assert inbox() == {"evt-0": "accepted"}


def test_event_the_database_refuses_fails_alone_and_the_rest_of_its_batch_is_stored(
    configure: Configure, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    configure(DATABASE_URL=pg_url, BROKER_URL=CLOSED_BROKER, WEBHOOK_SECRETS=SECRET)
    # A row the receiver finds valid and the database refuses: a constraint put there from
    # outside, as no event that passes the receiver's checks is known to be refused.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE roster_events ADD CONSTRAINT refuse_poison CHECK (id <> 'evt-poison')"
        )
    poison = event("evt-poison")

    async def scenario(http: httpx.AsyncClient, writer: InboxWriter) -> list[httpx.Response]:
        with held(pg_url, "evt-plug"):
            plug = asyncio.create_task(post(http, event("evt-plug")))
            await until(lambda: lock_waiters(pg_url), "the first batch to wait on the held row")
            batch = [event("evt-1"), poison, event("evt-2")]
            sends = [asyncio.create_task(post(http, sent)) for sent in batch]
            await until(lambda: writer.waiting == len(batch), "the batch to queue")
        await plug
        return await asyncio.gather(*sends)

    with caplog.at_level(logging.WARNING, logger="grassroots.api"):
        answers = run(scenario)

    by_event = {json.loads(a.request.content)["id"]: a.status_code for a in answers}
    assert by_event == {"evt-1": 202, "evt-poison": 500, "evt-2": 202}
    assert inbox() == dict.fromkeys(["evt-plug", "evt-1", "evt-2"], "accepted")
    assert any("one at a time" in r.getMessage() for r in caplog.records)


def test_batch_accepted_while_broker_is_down_is_answered_202_and_left_for_the_relay(
    configure: Configure, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    configure(DATABASE_URL=pg_url, BROKER_URL=CLOSED_BROKER, WEBHOOK_SECRETS=SECRET)
    sent = [event(f"evt-{n}") for n in range(20)]

    async def scenario(http: httpx.AsyncClient, writer: InboxWriter) -> list[httpx.Response]:
        return await asyncio.gather(*(post(http, e) for e in sent))

    with caplog.at_level(logging.WARNING, logger="grassroots.tasks"):
        answers = run(scenario)

    assert sorted(a.json()["event"] for a in answers) == sorted(e["id"] for e in sent)
    assert all(a.status_code == 202 and a.json()["status"] == "accepted" for a in answers)
    assert inbox() == {e["id"]: "accepted" for e in sent}
    # Every event was meant to be sent exactly once, whatever the batches were.
    left = [
        int(count)
        for record in caplog.records
        for count in re.findall(r"broker unavailable, (\d+) event", record.getMessage())
    ]
    assert left and sum(left) == len(sent)
