"""The Prometheus metrics: conversions labelled by role and outcome from the journal's rule, the
inbox's recent events by type and current status as a gauge (a status's count goes down), the
backlog whenever received; every query bounded by an index, a scrape kept a few seconds, and
``/metrics`` behind the ops token on whichever listener serves it."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Engine, delete, event, text, update

from models import (
    DeadLetter,
    ExitUnit,
    PollCursor,
    PollStatus,
    RosterEvent,
    RosterSync,
    SyncStatus,
    UnitStatus,
    utcnow,
)
from tasks import exits, heartbeat
from tasks.conversion.rules import rule_outcome
from tasks.inbox import inbox_row, store
from tasks.roster import load_snapshot
from tests.support.app_env import CLOSED_BROKER, CLOSED_DATABASE, Configure
from tests.support.databases import PgDatabases
from tests.support.process_logs import register
from tests.support.scenario import DISTRICT, KIM, STEVE, example
from tests.support.stack import BIN, OPS_TOKEN, SECRET, spare_port, wait_until
from worker import api
from worker.db import get_engine, session_scope
from worker.metrics import DISTRICT_SERIES, PipelineCollector
from worker.names import TaskName
from worker.signing import signed_headers


@pytest.mark.parametrize(
    ("rule", "labels"),
    [
        ("student", ("student", "converted")),
        ("admin+teacher:remove", ("admin+teacher", "converted")),
        ("admin:remove", ("admin", "removed")),
        ("admin:convert", ("admin", "converted")),
        ("lost:admin", ("admin", "role_removed")),
        ("lost:student+teacher", ("student+teacher", "role_removed")),
    ],
)
def test_conversion_rules_map_to_role_and_outcome(rule: str, labels: tuple[str, str]) -> None:
    assert rule_outcome(rule) == labels


def _store(*events: tuple[str, str]) -> None:
    rows = [
        inbox_row(
            {
                "id": event_id,
                "type": type_,
                "created": "2025-09-03T14:05:21.900Z",
                "data": {"object": {"id": STEVE, "district": DISTRICT}},
            },
            source="webhook",
        )
        for event_id, type_ in events
    ]
    with session_scope() as session:
        store(session, rows)


def registry_of(collector: PipelineCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_recent_events_by_status_are_a_gauge_that_goes_down_as_events_move_on(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    registry = registry_of(PipelineCollector(cache_seconds=0))
    _store(("m-1", "users.deleted"), ("m-2", "users.deleted"), ("m-3", "sections.updated"))

    def events(status: str, type_: str = "users.deleted") -> float | None:
        return registry.get_sample_value(
            "grassroots_events_last_24h", {"type": type_, "status": status}
        )

    assert (events("accepted"), events("accepted", "sections.updated")) == (2, 1)
    with session_scope() as session:
        session.execute(update(RosterEvent).where(RosterEvent.id == "m-1").values(status="done"))
    assert (events("accepted"), events("done")) == (1, 1)

    scraped = generate_latest(registry).decode()
    assert "# TYPE grassroots_events_last_24h gauge" in scraped.splitlines()
    assert "grassroots_events_last_24h_total" not in scraped


def test_events_older_than_a_day_leave_the_window_but_not_the_backlog(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    registry = registry_of(PipelineCollector(cache_seconds=0))
    _store(("old-held", "users.deleted"), ("old-done", "users.deleted"), ("new", "users.deleted"))
    with session_scope() as session:
        for event_id, status, attempts in (("old-held", "held", 3), ("old-done", "done", 2)):
            session.execute(
                update(RosterEvent)
                .where(RosterEvent.id == event_id)
                .values(
                    status=status, attempts=attempts, received_at=utcnow() - timedelta(hours=25)
                )
            )
        session.execute(update(RosterEvent).where(RosterEvent.id == "new").values(attempts=3))

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("grassroots_events_last_24h", type="users.deleted", status="accepted") == 1
    assert sample("grassroots_events_last_24h", type="users.deleted", status="held") is None
    assert sample("grassroots_events_last_24h", type="users.deleted", status="done") is None
    assert sample("grassroots_event_retries_last_24h") == 2
    backlog = {
        status: sample("grassroots_events_backlog", status=status)
        for status in ("accepted", "processing", "held", "dead", "deferred")
    }
    assert backlog == {"accepted": 1, "processing": 0, "held": 1, "dead": 0, "deferred": 0}
    assert sample("grassroots_held_removals") == 1


def test_a_scrape_is_kept_for_a_few_seconds(configure: Configure, database_url: str) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    now = [100.0]
    registry = registry_of(PipelineCollector(cache_seconds=5, clock=lambda: now[0]))
    statements: list[str] = []
    event.listen(get_engine(), "before_cursor_execute", lambda *a: statements.append(a[2]))
    _store(("c-1", "users.deleted"))

    def accepted() -> float | None:
        return registry.get_sample_value(
            "grassroots_events_last_24h", {"type": "users.deleted", "status": "accepted"}
        )

    def reads() -> int:
        return sum(1 for sql in statements if sql.lstrip().upper().startswith("SELECT"))

    assert accepted() == 1
    queried = reads()
    _store(("c-2", "users.deleted"))
    now[0] += 4.9
    assert accepted() == 1
    assert reads() == queried  # the scrape was kept: not one query
    now[0] += 0.1
    assert accepted() == 2


def labelled(registry: CollectorRegistry, name: str, label: str) -> dict[str, float]:
    """A family's samples by the value of one label."""
    return {
        sample.labels[label]: sample.value
        for metric in registry.collect()
        if metric.name == name
        for sample in metric.samples
    }


def test_an_idle_pipeline_shows_nothing_waiting(configure: Configure, database_url: str) -> None:
    """What the alerts watch, with nothing waiting; the heartbeat's age is the receiver's uptime
    until a worker has run one, then the age of that one."""
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    registry = registry_of(PipelineCollector(cache_seconds=0, uptime=lambda: 42.0))
    idle = {
        name: registry.get_sample_value(name)
        for name in (
            "grassroots_pending_event_oldest_age_seconds",
            "grassroots_dead_letters",
            "grassroots_dead_letter_oldest_age_seconds",
            "grassroots_worker_heartbeat_age_seconds",
            "grassroots_heartbeat_max_age_seconds",
        )
    }
    assert idle == {
        "grassroots_pending_event_oldest_age_seconds": 0,
        "grassroots_dead_letters": 0,
        "grassroots_dead_letter_oldest_age_seconds": 0,
        "grassroots_worker_heartbeat_age_seconds": 42.0,
        "grassroots_heartbeat_max_age_seconds": 300.0,
    }
    # Nothing stalled, failing or dead: no series (their families are exported all the same).
    by_group = (
        "grassroots_district_exits_stalled",
        "grassroots_district_sync_problems",
        "grassroots_dead_letters_by_task",
    )
    families = {metric.name: metric.samples for metric in registry.collect()}
    assert {name: len(families[name]) for name in by_group} == dict.fromkeys(by_group, 0)
    with session_scope() as session:
        heartbeat.record(session)
    assert registry.get_sample_value("grassroots_worker_heartbeat_age_seconds") == pytest.approx(
        0, abs=30
    )


def test_what_waits_for_an_operator_is_counted_and_aged(
    configure: Configure, database_url: str
) -> None:
    """The oldest pending event's age, open dead letters by task and reason, stalled exits,
    and districts whose sync failed or that need a resync."""
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    registry = registry_of(PipelineCollector(cache_seconds=0))
    now = utcnow()
    _store(("p-old", "users.deleted"), ("p-new", "users.deleted"))
    with session_scope() as session:
        session.execute(
            update(RosterEvent)
            .where(RosterEvent.id == "p-old")
            .values(received_at=now - timedelta(minutes=11))
        )
        load_snapshot(session, example())
        plan = exits.start_exit(session, DISTRICT, trigger="test")
        session.execute(
            update(ExitUnit)
            .where(ExitUnit.exit_id == plan.exit_id, ExitUnit.key == exits.TEACHER_UNIT + KIM)
            .values(status=UnitStatus.DEAD)
        )
        for task, reason, ago in (
            (TaskName.EXIT_UNIT, "retries_exhausted", 30),
            (TaskName.PROCESS_EVENT, "error", 90),
            (TaskName.PROCESS_EVENT, "error", 10),
        ):
            failed = now - timedelta(seconds=ago)
            session.add(DeadLetter(task=task, reason=reason, error="x", first_failed_at=failed))
        session.add(DeadLetter(task="closed", reason="error", error="x", resolved_at=now))
        for sync_id, status, minutes in (("s-1", SyncStatus.DONE, 20), ("s-2", "failed", 10)):
            started = now - timedelta(minutes=minutes)
            session.add(
                RosterSync(
                    id=sync_id,
                    district_id="d-synced",
                    status=status,
                    trigger="test",
                    started_at=started,
                )
            )
        session.add(PollCursor(district_id="d-missed", status=PollStatus.RESYNC_NEEDED))

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name)

    assert sample("grassroots_pending_event_oldest_age_seconds") == pytest.approx(660, abs=30)
    assert labelled(registry, "grassroots_district_exits_stalled", "district") == {DISTRICT: 1}
    assert sample("grassroots_dead_letters") == 3
    assert sample("grassroots_dead_letter_oldest_age_seconds") == pytest.approx(90, abs=30)
    by_task = {
        (s.labels["task"], s.labels["reason"]): s.value
        for metric in registry.collect()
        if metric.name == "grassroots_dead_letters_by_task"
        for s in metric.samples
    }
    assert by_task == {
        ("grassroots.exit_unit", "retries_exhausted"): 1,
        ("grassroots.process_event", "error"): 2,
    }
    problems = {
        (s.labels["district"], s.labels["problem"]): s.value
        for metric in registry.collect()
        if metric.name == "grassroots_district_sync_problems"
        for s in metric.samples
    }
    assert problems == {("d-synced", "sync_failed"): 1, ("d-missed", "resync_needed"): 1}


def test_a_metric_by_district_has_a_series_for_each_up_to_a_cap(
    configure: Configure, database_url: str
) -> None:
    """The districts whose cursor moved longest ago each get a series; the others are one,
    ``district="other"``, the oldest of them. Districts with a problem: ``other`` counts them."""
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    registry = registry_of(PipelineCollector(cache_seconds=0))
    now = utcnow()
    with session_scope() as session:
        for n in range(DISTRICT_SERIES + 2):
            moved = now - timedelta(hours=100 - n)
            session.add(PollCursor(district_id=f"d-{n:03}", last_success_at=moved))
            session.add(
                RosterSync(id=f"s-{n:03}", district_id=f"d-{n:03}", status="failed", trigger="test")
            )
    ages = labelled(registry, "grassroots_poll_cursor_age_seconds", "district")
    assert len(ages) == DISTRICT_SERIES + 1
    assert ages["d-000"] == pytest.approx(100 * 3600, abs=30)
    assert f"d-{DISTRICT_SERIES - 1:03}" in ages
    assert f"d-{DISTRICT_SERIES:03}" not in ages
    assert ages["other"] == pytest.approx((100 - DISTRICT_SERIES) * 3600, abs=30)
    failed = labelled(registry, "grassroots_district_sync_problems", "district")
    assert len(failed) == DISTRICT_SERIES + 1
    assert failed["other"] == 2 and failed["d-000"] == 1
    with session_scope() as session:
        session.execute(delete(PollCursor).where(PollCursor.district_id > "d-002"))
    assert set(labelled(registry, "grassroots_poll_cursor_age_seconds", "district")) == {
        "d-000",
        "d-001",
        "d-002",
    }


BOUNDED_TABLES = ("roster_events", "conversion_journal", "roster_syncs", "dead_letters")


def unbounded_reads(node: dict[str, Any]) -> list[str]:
    """The scans in a JSON plan that read one of the big tables whole: sequentially, or along an
    index without a condition on it."""
    found = []
    kind = node["Node Type"]
    table = node.get("Relation Name") or next(
        (t for t in BOUNDED_TABLES if node.get("Index Name", "").startswith(f"ix_{t}_")), None
    )
    scans = table in BOUNDED_TABLES and "Scan" in kind and "Bitmap Heap" not in kind
    if scans and (kind == "Seq Scan" or "Index Cond" not in node):
        found.append(f"{kind} on {table}")
    for child in node.get("Plans", []):
        found += unbounded_reads(child)
    return found


def test_every_scrape_query_reads_the_big_tables_through_an_index(
    configure: Configure, pg_databases: PgDatabases
) -> None:
    configure(DATABASE_URL=pg_databases.new(), BROKER_URL=CLOSED_BROKER)
    engine: Engine = get_engine()
    statements: list[tuple[str, object]] = []

    def record(*args: object) -> None:
        statements.append((str(args[2]), args[3]))

    event.listen(engine, "before_cursor_execute", record)
    registry_of(PipelineCollector(cache_seconds=0)).get_sample_value("grassroots_up")
    event.remove(engine, "before_cursor_execute", record)
    reads = [(sql, params) for sql, params in statements if sql.lstrip().startswith("SELECT")]
    assert any("roster_events" in sql for sql, _ in reads)

    def plan(conn: Any, sql: str, params: object) -> dict[str, Any]:
        cursor = conn.connection.driver_connection.cursor()
        cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
        found: dict[str, Any] = cursor.fetchone()[0][0]["Plan"]
        return found

    with engine.connect() as conn:
        # The tables are empty: the planner would read them whole whatever the indexes. With
        # sequential scans priced out, one is still chosen only where no index serves.
        conn.execute(text("SET enable_seqscan = off"))
        # What the scrape did before it was bounded is caught.
        whole = "SELECT type, status, count(*) FROM roster_events GROUP BY type, status"
        assert unbounded_reads(plan(conn, whole, {})) != []
        for sql, params in reads:
            assert unbounded_reads(plan(conn, sql, params)) == [], sql


def test_registering_the_collector_scrapes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The receiver registers it at import, before any database or broker need answer.
    def scrape(self: PipelineCollector) -> None:
        raise AssertionError("scraped at registration")

    monkeypatch.setattr(PipelineCollector, "collect", scrape)
    CollectorRegistry(auto_describe=True).register(PipelineCollector())


# --- /metrics on the listeners -----------------------------------------------------------------


@pytest.fixture
def fresh_scrapes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The receiver's collector is the process's: another test's scrape must not be served here.
    for collector in list(api.registry._collector_to_names):
        if isinstance(collector, PipelineCollector):
            monkeypatch.setattr(collector, "cache_seconds", 0)
    yield


AUTH = {"authorization": f"Bearer {OPS_TOKEN}"}


@pytest.mark.parametrize("served", [api.app, api.ops_app], ids=["all", "ops"])
def test_metrics_need_the_ops_token(
    configure: Configure, fresh_scrapes: None, served: FastAPI
) -> None:
    configure(DATABASE_URL=CLOSED_DATABASE, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=OPS_TOKEN)
    with TestClient(served) as client:
        refused = client.get("/metrics")
        wrong = client.get("/metrics", headers={"authorization": "Bearer not-the-ops-token"})
        scraped = client.get("/metrics", headers=AUTH)

    assert (refused.status_code, wrong.status_code) == (401, 401)
    assert refused.headers["www-authenticate"] == "Bearer"
    assert scraped.status_code == 200
    assert 'grassroots_up{dependency="database"} 0.0' in scraped.text


def test_the_webhooks_listener_serves_webhooks_and_health_only(
    configure: Configure, database_url: str
) -> None:
    configure(
        DATABASE_URL=database_url,
        BROKER_URL=CLOSED_BROKER,
        OPS_TOKEN=OPS_TOKEN,
        WEBHOOK_SECRETS=SECRET,
    )
    body = b'{"id": "routes-1", "type": "users.updated", "data": {"object": {"id": "x"}}}'
    headers = {"content-type": "application/json", **signed_headers(SECRET, body)}
    with TestClient(api.webhooks_app) as client:
        assert client.post("/webhooks/clever", content=body, headers=headers).status_code == 202
        assert client.get("/healthz").status_code == 200
        for path in ("/metrics", "/ops/status"):
            assert client.get(path, headers=AUTH).status_code == 404
    with TestClient(api.ops_app) as client:
        assert client.post("/webhooks/clever", content=body, headers=headers).status_code == 404
        assert client.get("/ops/events/routes-1", headers=AUTH).status_code == 200
        assert client.get("/healthz").status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    ("routes", "webhook", "metrics"), [("ops", 404, 200), ("webhooks", 401, 404), ("all", 401, 200)]
)
def test_serve_routes_picks_what_its_listener_serves(
    tmp_path: Path, routes: str, webhook: int, metrics: int
) -> None:
    port = spare_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
        "DATABASE_URL": CLOSED_DATABASE,
        "BROKER_URL": CLOSED_BROKER,
        "OPS_TOKEN": OPS_TOKEN,
        "WEBHOOK_SECRETS": SECRET,
    }
    log = tmp_path / f"serve-{routes}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(BIN), "serve", "--port", str(port), "--routes", routes],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    register(f"grassroots serve --routes {routes}", log, proc)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=30, what=f"serve --routes {routes}")
        unsigned = httpx.post(f"{base}/webhooks/clever", json={}, timeout=10)
        scraped = httpx.get(f"{base}/metrics", headers=AUTH, timeout=10)
        assert (unsigned.status_code, scraped.status_code) == (webhook, metrics)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
