"""The workers' heartbeat: beat sends ``grassroots.heartbeat`` through the events queue, a worker
stamps its row, and ``/readyz`` fails once it is older than HEARTBEAT_MAX_AGE (or, never
stamped, once the receiver has been up that long), which no process-alive check can tell. Its
age is a metric, and it never keeps ``pending`` above 0."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from models import Heartbeat, utcnow
from tasks import heartbeat
from tests.support.app_env import Configure
from tests.support.databases import PgDatabases
from tests.support.stack import OPS_TOKEN, RedisServer, running_stack, wait_until
from worker import api
from worker.celery_app import build_config
from worker.db import get_engine, session_scope
from worker.metrics import PipelineCollector
from worker.names import ROUTES, Queue, TaskName
from worker.settings import load_settings

AUTH = {"authorization": f"Bearer {OPS_TOKEN}"}


def test_a_heartbeat_is_one_row_stamped_again_by_each_beat(session: Session) -> None:
    assert heartbeat.age(session) is None

    heartbeat.record(session, host="w1")
    heartbeat.record(session, host="w2")

    rows = session.scalars(select(Heartbeat)).all()
    assert [(row.name, row.host) for row in rows] == [("events", "w2")]
    age = heartbeat.age(session)
    assert age is not None and 0 <= age < 5
    later = heartbeat.age(session, now=utcnow() + timedelta(seconds=90))
    assert later is not None and 89 < later < 95


@pytest.mark.parametrize(
    ("last", "uptime", "ready", "check"),
    [
        (10.0, 1000.0, True, "ok"),
        (300.0, 1000.0, True, "ok"),
        (
            301.0,
            1000.0,
            False,
            "stale: the last heartbeat a worker ran was 301 s ago (HEARTBEAT_MAX_AGE=300 s): no"
            " worker takes work from the events queue",
        ),
        (None, 12.0, True, "ok: no heartbeat yet (12 s up, HEARTBEAT_MAX_AGE=300 s)"),
        (
            None,
            301.0,
            False,
            "stale: no worker has run the heartbeat task in the 301 s this receiver has been up"
            " (HEARTBEAT_MAX_AGE=300 s): no worker takes work from the events queue",
        ),
    ],
)
def test_the_heartbeat_verdict(last: float | None, uptime: float, ready: bool, check: str) -> None:
    assert heartbeat.verdict(last, max_age=300, uptime=uptime) == heartbeat.Verdict(ready, check)


def test_a_max_age_of_zero_turns_the_check_off() -> None:
    assert heartbeat.verdict(None, max_age=0, uptime=1e9) == heartbeat.Verdict(True, "off")


def test_beat_sends_the_heartbeat_through_the_events_queue_every_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HEARTBEAT_INTERVAL", "7")
    entry = build_config(load_settings())["beat_schedule"]["heartbeat"]

    assert entry == {"task": TaskName.HEARTBEAT, "schedule": 7.0, "options": {"expires": 7.0}}
    assert ROUTES[TaskName.HEARTBEAT] == {"queue": Queue.EVENTS}


# --- /readyz and /metrics ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("heartbeat")) as server:
        yield server


@pytest.fixture
def ready_app(
    configure: Configure, database_url: str, broker: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    configure(DATABASE_URL=database_url, BROKER_URL=broker.url, OPS_TOKEN=OPS_TOKEN)
    for collector in list(api.registry._collector_to_names):
        if isinstance(collector, PipelineCollector):
            monkeypatch.setattr(collector, "cache_seconds", 0)
    monkeypatch.setattr(api.READINESS, "cache_seconds", 0)
    with TestClient(api.app) as client:
        yield client


def beat_ago(seconds: float) -> None:
    with session_scope() as session:
        heartbeat.record(session, host="w1")
        session.execute(update(Heartbeat).values(at=utcnow() - timedelta(seconds=seconds)))


def test_readyz_fails_naming_a_stale_heartbeat(ready_app: TestClient) -> None:
    beat_ago(10)
    fresh = ready_app.get("/readyz")
    assert fresh.status_code == 200
    assert fresh.json() == {"ready": True, "database": "ok", "heartbeat": "ok", "broker": "ok"}

    beat_ago(301)
    stale = ready_app.get("/readyz")

    assert stale.status_code == 503
    body = stale.json()
    assert body["ready"] is False and (body["database"], body["broker"]) == ("ok", "ok")
    assert body["heartbeat"].startswith("stale: the last heartbeat a worker ran was 301 s ago")


def test_readyz_gives_a_fresh_deployment_time_for_its_first_heartbeat(
    ready_app: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    starting = ready_app.get("/readyz")
    assert starting.status_code == 200
    assert starting.json()["heartbeat"].startswith("ok: no heartbeat yet")

    # Up longer than HEARTBEAT_MAX_AGE (300 s), and still no worker has run a heartbeat.
    monkeypatch.setattr(api, "_started", time.monotonic() - 301)
    never = ready_app.get("/readyz")

    assert never.status_code == 503
    assert never.json()["heartbeat"].startswith("stale: no worker has run the heartbeat task")


def test_a_flood_of_readyz_probes_opens_no_connection_and_checks_once_a_second(
    configure: Configure, database_url: str, broker: RedisServer
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=broker.url)
    engine = get_engine()
    checks, connects = [0], [0]

    def on_execute(_c: object, _cur: object, statement: str, *_: object) -> None:
        checks[0] += "FROM heartbeats" in statement

    def on_connect(*_: object) -> None:
        connects[0] += 1

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "connect", on_connect)
    try:
        with TestClient(api.app) as client, redis.Redis.from_url(broker.url) as watch:
            assert client.get("/readyz").status_code == 200  # opens the pooled connections
            received = watch.info("stats")["total_connections_received"]
            before = checks[0], connects[0]
            started = time.monotonic()
            for _ in range(500):
                assert client.get("/readyz").status_code == 200
            took = time.monotonic() - started
            assert watch.info("stats")["total_connections_received"] == received
            # One check per cache_seconds at most, whatever the probes' rate.
            flooded = checks[0] - before[0]
            assert flooded <= took / api.READINESS.cache_seconds + 1
            # And the answer is checked again once it is older than that.
            wait_until(
                lambda: client.get("/readyz") and checks[0] > before[0] + flooded,
                timeout=10,
                what="a fresh check",
            )
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "connect", on_connect)
    assert connects[0] == before[1]


def test_the_heartbeat_age_is_a_metric(ready_app: TestClient) -> None:
    def age() -> str:
        lines = ready_app.get("/metrics", headers=AUTH).text.splitlines()
        return next((ln for ln in lines if ln.startswith("grassroots_worker_heartbeat_age")), "")

    # Never stamped: the seconds since the receiver started, as /readyz counts them.
    assert 0 <= float(age().split()[1]) <= api.uptime()
    beat_ago(42)
    seconds = float(age().split()[1])
    assert 42 <= seconds < 50


# --- for real: beat, a worker, the receiver ------------------------------------------------------


@pytest.mark.slow
def test_a_stopped_worker_fails_readyz_and_its_heartbeats_never_count_as_pending(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    with running_stack(
        tmp_path,
        pg_databases.new(),
        beat=True,
        HEARTBEAT_INTERVAL="1",
        HEARTBEAT_MAX_AGE="4",
    ) as stack:

        def readiness() -> dict[str, object]:
            found: dict[str, object] = stack.ops("GET", "/readyz").json()
            return found

        wait_until(lambda: readiness()["heartbeat"] == "ok", timeout=60, what="a heartbeat")
        assert readiness()["ready"] is True
        assert stack.wait_idle()["pending"] == 0

        # Alive, as far as any process check can tell, and taking no work.
        worker = stack.procs["worker0"]
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: readiness()["ready"] is False, timeout=30, what="/readyz to fail")
            stale = readiness()
            assert str(stale["heartbeat"]).startswith("stale: the last heartbeat a worker ran")
            assert stack.ops("GET", "/readyz").status_code == 503
            # Heartbeats pile up in the events queue meanwhile: they are not work in flight.
            status = wait_until(
                lambda: (s := stack.status())["queues"]["events"] >= 2 and s,
                timeout=30,
                what="heartbeats to queue up",
            )
            assert status["pending"] == 0
        finally:
            os.killpg(worker.pid, signal.SIGCONT)
        wait_until(lambda: readiness()["ready"] is True, timeout=60, what="/readyz to recover")
        assert stack.wait_idle()["pending"] == 0
