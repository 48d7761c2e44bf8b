"""The relay (``worker.relay``): a loop in the beat process that sends again what never reached the
workers, silent while there is nothing to send, and never a Celery task of its own.

The loop's logging with a played pass; one real pass against a real Redis and database; and a
real beat process, idle and then through a broker outage.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.transport.redis import Channel
from sqlalchemy import update

from models import DistrictExit, EventStatus, OperatorRequest, RequestKind, RosterEvent, utcnow
from tasks import exits, operator_requests
from tasks.inbox import inbox_row, store
from tasks.roster import load_snapshot
from tests.support.databases import PgDatabases
from tests.support.scenario import DISTRICT, STEVE, example
from tests.support.stack import Stack, clever_event, running_stack, wait_until
from worker.db import session_scope
from worker.relay import RelayLoop, relay_pass

IDLE = {"events": 0, "exits": 0, "requests": 0, "restored": 0}
T0 = "2025-09-03T14:05:21.900Z"


class Passes:
    """A played relay pass: each call takes the next outcome (counts, or an exception)."""

    def __init__(self, *outcomes: dict[str, int] | Exception) -> None:
        self.outcomes = list(outcomes)

    def __call__(self) -> dict[str, int]:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def run_loop(run_pass: Passes, interval: float = 5.0) -> tuple[RelayLoop, list[float]]:
    """Run the loop until every played outcome is used; returns it and the waits it asked for."""
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        return not run_pass.outcomes  # stopped once nothing is left to play

    loop = RelayLoop(interval, run_pass=run_pass, wait=wait)
    loop.run()
    return loop, waits


def relay_records(caplog: pytest.LogCaptureFixture, level: int) -> list[tuple[str, str]]:
    return [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "grassroots.relay" and r.levelno >= level
    ]


def test_idle_passes_log_nothing_above_debug_and_keep_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="grassroots.relay"):
        loop, waits = run_loop(Passes(*[IDLE] * 5), interval=5.0)
    assert loop.passes == 5
    assert relay_records(caplog, logging.INFO) == []
    assert [m for _, m in relay_records(caplog, logging.DEBUG)] == [
        f"relay pass {n} done" for n in range(1, 6)
    ]
    # The next pass is due an interval after this one started.
    assert len(waits) == 5 and all(4.0 < w <= 5.0 for w in waits)


def test_a_pass_that_relays_says_what_it_did_with_counts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="grassroots.relay"):
        run_loop(
            Passes({**IDLE, "events": 3, "exits": 1, "restored": 2}, IDLE, {**IDLE, "exits": 4})
        )
    assert relay_records(caplog, logging.INFO) == [
        (
            "WARNING",
            "relayed: put back 2 task(s) a lost worker had taken, sent 3 event(s) again,"
            " resumed 1 stalled exit(s)",
        ),
        ("WARNING", "relayed: resumed 4 stalled exit(s)"),
    ]
    first = next(r for r in caplog.records if r.name == "grassroots.relay")
    assert first.__dict__["relayed"] == {**IDLE, "events": 3, "exits": 1, "restored": 2}


def test_failures_are_logged_once_per_streak_and_never_end_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = ConnectionError("broker down")
    outcomes: list[dict[str, int] | Exception] = [
        down,
        down,
        down,
        IDLE,
        {**IDLE, "events": 1},
        down,
        down,
        IDLE,
    ]
    with caplog.at_level(logging.INFO, logger="grassroots.relay"):
        loop, _ = run_loop(Passes(*outcomes), interval=1.0)
    assert loop.passes == len(outcomes) and loop.failed == 0
    assert [(level, m.split(";")[0]) for level, m in relay_records(caplog, logging.INFO)] == [
        ("ERROR", "relay pass failed"),
        ("WARNING", "relay passes succeed again after 3 failed in a row"),
        ("WARNING", "relayed: sent 1 event(s) again"),
        ("ERROR", "relay pass failed"),
        ("WARNING", "relay passes succeed again after 2 failed in a row"),
    ]
    failure = next(r for r in caplog.records if r.levelname == "ERROR")
    assert failure.exc_info is not None and failure.exc_info[1] is down


# --------------------------------------------------------------------------------------------
# One real pass


def _accepted(event_id: str, *, ago: timedelta) -> None:
    raw = {
        "id": event_id,
        "type": "users.deleted",
        "created": "2025-09-03T14:05:21.900Z",
        "data": {"object": {"id": STEVE, "district": DISTRICT}},
    }
    with session_scope() as session:
        store(session, [inbox_row(raw, source="webhook", now=utcnow() - ago)])


def _queued(client: redis.Redis, queue: str) -> list[Any]:
    return [json.loads(m)["headers"]["argsrepr"] for m in client.lrange(queue, 0, -1)]


def test_a_pass_sends_what_waited_too_long_once_and_leaves_what_is_recent(
    broker: redis.Redis,
) -> None:
    _accepted("evt-old", ago=timedelta(minutes=5))
    _accepted("evt-new", ago=timedelta(seconds=1))
    with session_scope() as session:
        load_snapshot(session, example())
    with session_scope() as session:
        exit_id = exits.start_exit(session, DISTRICT, trigger="test").exit_id
        # Its units were sent and lost (a killed worker): nothing has progressed for a while.
        session.execute(
            update(DistrictExit)
            .where(DistrictExit.id == exit_id)
            .values(progressed_at=utcnow() - timedelta(minutes=5))
        )

    assert relay_pass() == {**IDLE, "events": 1, "exits": 1}
    assert _queued(broker, "events") == ["('evt-old',)"]
    units = _queued(broker, "fanout")
    assert units and all(args.startswith(f"({exit_id}, ") for args in units)

    # Queued already: the next pass sends nothing twice.
    assert relay_pass() == IDLE
    assert _queued(broker, "events") == ["('evt-old',)"]
    assert _queued(broker, "fanout") == units


def _processing(event_id: str, task_id: str, *, ago: timedelta) -> None:
    """The event a worker took as task ``task_id``, ``ago`` since its last attempt began."""
    _accepted(event_id, ago=ago)
    with session_scope() as session:
        session.execute(
            update(RosterEvent)
            .where(RosterEvent.id == event_id)
            .values(status=EventStatus.PROCESSING, task_id=task_id, updated_at=utcnow() - ago)
        )


def test_a_pass_leaves_an_event_whose_task_a_worker_still_holds(broker: redis.Redis) -> None:
    # Both have been processing for longer than any retry wait: one worker still holds its
    # message (a long task; a killed worker's copy would be put back by the restore), the
    # other's message is gone.
    _processing("evt-held", "task-held", ago=timedelta(hours=2))
    _processing("evt-lost", "task-lost", ago=timedelta(hours=2))
    message = {"headers": {"id": "task-held", "task": "grassroots.process_event"}}
    # As kombu records a delivered message (delivered just now: no restore considers it yet).
    broker.hset(Channel.unacked_key, "tag-1", json.dumps([message, "", "events"]))
    broker.zadd(Channel.unacked_index_key, {"tag-1": time.time()})

    assert relay_pass() == {**IDLE, "events": 1}
    assert _queued(broker, "events") == ["('evt-lost',)"]
    with session_scope() as session:
        held = session.get(RosterEvent, "evt-held")
        assert held is not None and held.attempts == 0


def _request(status: str, *, ago: timedelta, task_id: str) -> str:
    """An exit's request, last sent (and, if taken, last tried by a worker) ``ago``."""
    with session_scope() as session:
        asked = operator_requests.ask(session, RequestKind.EXIT, DISTRICT, by="test")
        session.execute(
            update(OperatorRequest)
            .where(OperatorRequest.id == asked.id)
            .values(
                status=status,
                task_id=task_id,
                sent_at=utcnow() - ago,
                taken_at=None if status == "asked" else utcnow() - ago,
            )
        )
    return asked.id


def test_a_pass_sends_again_the_requests_the_broker_lost_and_no_others(
    broker: redis.Redis,
) -> None:
    lost = _request("asked", ago=timedelta(minutes=5), task_id="t-lost")
    lost_with_a_worker = _request("taken", ago=timedelta(hours=2), task_id="t-gone")
    _request("asked", ago=timedelta(seconds=1), task_id="t-new")  # still on its way
    _request("taken", ago=timedelta(minutes=5), task_id="t-retrying")  # may wait out a retry
    _request("taken", ago=timedelta(hours=2), task_id="t-held")  # a worker still holds it
    _request("done", ago=timedelta(hours=2), task_id="t-done")
    message = {"headers": {"id": "t-held", "task": "grassroots.district_exit"}}
    broker.hset(Channel.unacked_key, "tag-1", json.dumps([message, "", "fanout"]))
    broker.zadd(Channel.unacked_index_key, {"tag-1": time.time()})

    assert relay_pass() == {**IDLE, "requests": 2}
    sent = sorted(_queued(broker, "fanout"))
    assert sent == sorted(f"('{DISTRICT}', '{r}')" for r in (lost, lost_with_a_worker))
    # Queued already: the next pass sends nothing twice.
    assert relay_pass() == IDLE


# --------------------------------------------------------------------------------------------
# A real beat process


def beat_relay_lines(stack: Stack) -> list[dict[str, Any]]:
    """The beat's log lines from the relay (JSON lines; Celery's banner is not)."""
    lines = []
    for line in stack.log("beat").splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("logger") == "grassroots.relay":
            lines.append(record)
    return lines


def passes(stack: Stack, where: Callable[[dict[str, Any]], bool] = lambda r: True) -> int:
    return sum(
        1
        for r in beat_relay_lines(stack)
        if r["level"] == "debug" and r["msg"].startswith("relay pass") and where(r)
    )


def pushes(client: redis.Redis) -> int:
    """Messages published to any queue so far (kombu's Redis transport LPUSHes each)."""
    return int(client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0))


@pytest.mark.slow
def test_beat_is_silent_when_idle_and_relays_an_event_accepted_while_redis_was_down(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    url = pg_databases.new()
    # RELAY_INTERVAL=1 and RELAY_AFTER_SECONDS=2 (tests.support.stack): an accepted event is sent
    # again about 3 s after it was accepted, once the broker answers.
    with running_stack(tmp_path, url) as stack:
        normal = stack.env
        stack.env = {**normal, "LOG_LEVEL": "DEBUG"}  # for beat alone: a pass's DEBUG line
        try:
            stack.start_beat()
        finally:
            stack.env = normal

        # Idle: passes run, and write nothing above DEBUG nor send any task.
        wait_until(lambda: passes(stack) >= 1, timeout=30, what="beat's first relay pass")
        with redis.Redis.from_url(stack.redis.url) as client:
            sent_before = pushes(client)
            seen = passes(stack)
            wait_until(lambda: passes(stack) >= seen + 4, timeout=30, what="four more passes")
            assert pushes(client) == sent_before
        assert [r for r in beat_relay_lines(stack) if r["level"] != "debug"] == []
        assert "Sending due task" not in stack.log("beat")
        assert "grassroots.relay" not in stack.log("worker0")

        # Redis down: the event is accepted, and the failing passes are logged once.
        stack.redis.stop()
        event = clever_event(
            "relay-1", "users.deleted", {"id": "0" * 24, "district": DISTRICT}, created=T0
        )
        answer = stack.post(event)
        assert (answer.status_code, answer.json()["status"]) == (202, "accepted")
        wait_until(
            lambda: passes(stack, lambda r: r["failing"] >= 2),
            timeout=60,
            what="two failed relay passes in a row",
        )
        stack.redis.start()

        def relayed() -> list[dict[str, Any]]:
            return [r for r in beat_relay_lines(stack) if r["msg"].startswith("relayed:")]

        # Within a failed pass's broker timeout, an interval and RELAY_AFTER_SECONDS.
        (line,) = wait_until(relayed, timeout=20, what="the relay to send the event")
        assert line["level"] == "warning" and line["relayed"]["events"] == 1
        wait_until(
            lambda: stack.event(event["id"])["status"] not in ("accepted", "processing"),
            timeout=90,
            what="the relayed event processed",
        )
        loud = [(r["level"], r["msg"]) for r in beat_relay_lines(stack) if r["level"] != "debug"]
        # The failing streak is logged once when it starts and once when it ends. The event may
        # be relayed twice on a loaded machine: taken from the queue by the worker, it is
        # "accepted" for a moment before the worker counts its attempt, and a pass that falls
        # in that moment sends it again (harmless: the second copy finds it processed).
        assert [level for level, _ in loud[:3]] == ["error", "warning", "warning"]
        assert loud[0][1].startswith("relay pass failed;")
        assert loud[1][1].startswith("relay passes succeed again after")
        assert loud[2][1] == line["msg"]
        assert all(msg.startswith("relayed: sent 1 event(s) again") for _, msg in loud[3:])
