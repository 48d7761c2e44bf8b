"""The task base class (``worker.tasking.GrassrootsTask``) while PostgreSQL or Redis goes away,
with real processes, no eager mode: a PostgreSQL restart (a private server of the test's own),
Redis connections dropped during a long task, and Redis killed and restarted under tasks. Each
ends with every event applied once, nothing lost or doubled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.support import scenario
from tests.support.databases import PgDatabases
from tests.support.faults import (
    blocked_conversion,
    dead_letters,
    deleted,
    journal_entries,
    lock_waiters,
    outcomes,
    post_and_wait,
    row_lock,
    scalar,
    seed_copy,
)
from tests.support.scenario import Copy
from tests.support.stack import Stack, running_stack, spare_port, wait_until
from worker.migrate import upgrade

pytestmark = pytest.mark.slow

STUDENTS = (scenario.STEVE, scenario.MARIA, scenario.LEO)


# --------------------------------------------------------------------------------------------
# 1. A PostgreSQL restart


def _postgres_bindir() -> Path | None:
    try:
        found = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        found = ""
    for candidate in (found, "/usr/lib/postgresql/15/bin"):
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


class PrivatePostgres:
    """A PostgreSQL instance of one test's own, on a spare port, that the test may restart. As
    root, its server runs as the ``postgres`` user (initdb refuses root), in a directory that
    user can reach."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = spare_port()
        self.as_root = os.geteuid() == 0
        self.home = Path(tempfile.mkdtemp(prefix="grassroots-pg-"))
        if self.as_root:
            shutil.chown(self.home, "postgres", "postgres")
        self.data = self.home / "data"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        argv = [str(self.bindir / tool), *args]
        if self.as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=check, capture_output=True, timeout=120)

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        log = str(self.home / "log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", *args, check=check)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        self.resume()

    def resume(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.home}"
            " -c fsync=off -c full_page_writes=off"
        )
        self._pg_ctl("start", "-o", options)

    def restart(self) -> None:
        """A fast restart: every connection is ended, the server is back when this returns."""
        self._pg_ctl("restart", "-m", "fast")

    def halt(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def destroy(self) -> None:
        self._pg_ctl("stop", "-m", "immediate", check=False)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    server = PrivatePostgres(bindir)
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@contextmanager
def lock_held_until_restart(url: str, table: str, row_id: str) -> Iterator[None]:
    """A row lock held until the server ends the connection (or the block ends)."""
    conn = psycopg.connect(url)
    try:
        conn.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", (row_id,))
        yield
    finally:
        with suppress(psycopg.Error):
            conn.close()


def statuses(stack: Stack, events: list[dict[str, Any]]) -> set[str] | None:
    """The events' statuses; None while the ops API answers 503 (its first requests on pooled
    connections a restart ended do)."""
    found = set()
    for event in events:
        answer = stack.ops("GET", f"/ops/events/{event['id']}")
        if answer.status_code == 503:
            return None
        assert answer.status_code == 200, answer.text
        found.add(answer.json()["status"])
    return found


def _tried_since(log: str, event_id: str) -> bool:
    """Whether a run of the event's task ended in ``log``: retried, or failed (Celery's trace
    names the task's arguments)."""
    for line in log.splitlines():
        if event_id not in line or not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event_id") == event_id and str(entry.get("msg", "")).startswith("retrying"):
            return True
        data = entry.get("data") or {}
        if entry.get("logger") == "celery.app.trace" and event_id in str(data.get("args", "")):
            return True
    return False


def test_worker_rides_through_a_postgres_restart(
    tmp_path: Path, private_postgres: PrivatePostgres
) -> None:
    """PostgreSQL restarted (fast: every connection ended) while a conversion is mid-transaction
    and more events wait in the queue; then down for longer, until the worker has tried every
    queued event against it. Every event posted before, between and after ends done, each
    account converted once, nothing dead-lettered: the worker retries what the outage failed,
    its attempt count included."""
    with psycopg.connect(private_postgres.url("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE grassroots")
    url = private_postgres.url("grassroots")
    upgrade(url)
    with running_stack(tmp_path, url, workers=0, LOCK_TIMEOUT_MS="60000") as stack:
        stack.start_worker("worker", concurrency=1)
        copies = [seed_copy(stack, tag) for tag in ("a004", "a014", "a024")]
        restarted, after, outage = copies
        posted: list[dict[str, Any]] = []

        def post_queued_behind_a_lock(copy: Copy, name: str) -> list[dict[str, Any]]:
            events = [deleted(copy, f"{name}-{n}", who) for n, who in enumerate(STUDENTS)]
            for event in events:
                assert stack.post(event).status_code == 202
            wait_until(lambda: lock_waiters(url) == 1, what="the first conversion to block")
            assert stack.event(events[-1]["id"])["status"] == "accepted"  # still queued
            return events

        # A fast restart, the first conversion mid-transaction, the others queued.
        with lock_held_until_restart(url, "accounts", restarted(scenario.STEVE)):
            posted += post_queued_behind_a_lock(restarted, "restart")
            private_postgres.restart()
        # Events posted once it is back. The receiver's first request on a connection the
        # restart ended answers 503 ("try again"), and Clever sends it again.
        for event in [deleted(after, f"after-{n}", who) for n, who in enumerate(STUDENTS)]:
            wait_until(
                lambda event=event: stack.post(event).status_code == 202,  # type: ignore[misc]
                timeout=10,
                what="the receiver to accept an event after the restart",
            )
            posted.append(event)
        wait_until(
            lambda: statuses(stack, posted) == {"done"},
            timeout=60,
            what="every event done after the restart",
        )
        # An outage longer than the short retries: each queued event is tried while it lasts.
        with lock_held_until_restart(url, "accounts", outage(scenario.STEVE)):
            queued = post_queued_behind_a_lock(outage, "outage")
            seen = len(stack.log("worker"))
            private_postgres.halt()
        wait_until(
            lambda: all(_tried_since(stack.log("worker")[seen:], e["id"]) for e in queued),
            timeout=30,
            what="every queued event to be tried while PostgreSQL is down",
        )
        private_postgres.resume()
        posted += queued
        wait_until(
            lambda: statuses(stack, posted) == {"done"},
            timeout=60,
            what="every event done after the outage",
        )
        for copy in copies:
            for who in STUDENTS:
                assert stack.account(copy(who))["kind"] == "grassroots"
                assert journal_entries(url, copy(who)) == 1
        assert dead_letters(url) == []


# --------------------------------------------------------------------------------------------
# 2. Redis connections dropped during a long task


def test_redis_connections_dropped_during_a_task_nothing_lost_or_doubled(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    """Every client connection to Redis killed (``CLIENT KILL TYPE normal``) while a conversion
    waits on a lock. A worker with no free slot is not reading from Redis: the conversion
    finishes once the lock is released, its result stands and its acknowledgement goes out on a
    new connection. A worker with a free slot sees the loss at once, cancels the task it can no
    longer acknowledge and takes it again once reconnected: delivered twice, counted twice,
    applied by the second delivery. Either way the event is applied once, and the worker
    processes an event posted afterwards."""
    url = pg_databases.new()
    with running_stack(tmp_path, url, workers=0, LOCK_TIMEOUT_MS="60000") as stack:
        client = redis.Redis(port=stack.redis.port)
        copy = seed_copy(stack, "a005")

        def drop_connections() -> None:
            assert int(client.client_kill_filter(_type="normal")) >= 1

        # A worker whose only slot is busy.
        stack.start_worker("busy", concurrency=1)
        with blocked_conversion(stack, url, copy, "drop-busy", scenario.STEVE) as (steve, event):
            task_id = scalar(url, "SELECT task_id FROM roster_events WHERE id = %s", event["id"])
            drop_connections()
        wait_until(
            lambda: stack.event(event["id"])["status"] == "done",
            timeout=15,
            what="the conversion to finish",
        )
        assert stack.wait_idle(timeout=15)["unacked"] == 0
        assert stack.event(event["id"])["attempts"] == 1
        assert outcomes(stack.log("busy"), task_id) == ["'done'"]
        stack.kill("busy", signal.SIGTERM)

        # A worker with a free slot, waiting on Redis for more work.
        stack.start_worker("waiting", concurrency=2)
        with blocked_conversion(stack, url, copy, "drop-waiting", scenario.MARIA) as (
            maria,
            second,
        ):
            waiting_id = scalar(
                url, "SELECT task_id FROM roster_events WHERE id = %s", second["id"]
            )
            drop_connections()
            wait_until(
                lambda: "Connection to broker lost" in stack.log("waiting"),
                timeout=10,
                what="the worker to see its connection lost",
            )
            # Cancelled, put back, and taken again: a second copy waits on the lock.
            wait_until(
                lambda: stack.log("waiting").count(f"[{waiting_id}] received") == 2,
                timeout=15,
                what="the cancelled task to be delivered again",
            )
            assert f"[{waiting_id}] cannot be acknowledged after a connection loss" in (
                stack.log("waiting")
            )
            wait_until(
                lambda: stack.event(second["id"])["attempts"] == 2,
                timeout=15,
                what="the redelivered copy to start",
            )
        wait_until(
            lambda: stack.event(second["id"])["status"] == "done",
            timeout=15,
            what="the conversion to be applied",
        )
        # The cancelled run returned nothing; the redelivered one applied it.
        assert outcomes(stack.log("waiting"), waiting_id) == ["'done'"]
        post_and_wait(
            stack,
            deleted(copy, "after-drop", scenario.LEO),
            "done",
            timeout=15,
            what="an event posted after the drop",
        )
        assert stack.wait_idle(timeout=15)["unacked"] == 0
        for student in (steve, maria, copy(scenario.LEO)):
            assert stack.account(student)["kind"] == "grassroots"
            assert journal_entries(url, student) == 1
        assert stack.event(second["id"])["attempts"] == 2
        assert dead_letters(url) == []


def test_redis_killed_and_restarted_under_tasks_the_same_worker_goes_on_and_nothing_is_lost(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    """Redis (append-only, as `grassroots run` and compose keep it) killed while two
    conversions wait on locks, their messages unacknowledged, and a third event waits in the
    queue; started again 5 s later. The same worker process goes on, with no supervisor and no
    beat: the tasks Celery cancelled on the lost connection are put back once Redis answers and
    run again, the queued event is processed, an event posted afterwards too, each applied
    once, nothing left unacknowledged. (It used to end the worker: "Unrecoverable error:
    AttributeError", kombu restoring the messages on the lost connection.)"""
    url = pg_databases.new()
    with running_stack(
        tmp_path, url, workers=0, persistent_redis=True, LOCK_TIMEOUT_MS="60000"
    ) as stack:
        worker = stack.start_worker("worker", concurrency=2)
        copy = seed_copy(stack, "a009")
        steve, maria, leo = (copy(who) for who in STUDENTS)
        running = [deleted(copy, f"restart-{n}", who) for n, who in enumerate(STUDENTS[:2])]
        queued = deleted(copy, "queued", scenario.LEO)
        with row_lock(url, "accounts", steve), row_lock(url, "accounts", maria):
            for event in running:
                assert stack.post(event).status_code == 202
            wait_until(lambda: lock_waiters(url) == 2, what="both conversions to block")
            assert stack.post(queued).status_code == 202
            wait_until(
                lambda: redis.Redis(port=stack.redis.port).llen("events") == 1,
                timeout=10,
                what="the third event to wait in its queue",
            )
            stack.redis.kill()
            time.sleep(5)  # the outage itself
            stack.redis.start()
            wait_until(
                lambda: (
                    "put back 2 message(s) a lost broker connection had left" in stack.log("worker")
                ),
                timeout=30,
                what="the worker to put back what it had taken",
            )
        for event in [*running, queued]:
            wait_until(
                lambda event=event: stack.event(event["id"])["status"] == "done",  # type: ignore[misc]
                timeout=60,
                what=f"{event['id']} to be done after the restart",
            )
        # Leo's again: applied already, so stale, but taken and processed.
        post_and_wait(
            stack,
            deleted(copy, "after-restart", scenario.LEO),
            "stale",
            what="an event posted after the restart",
        )
        assert stack.wait_idle(timeout=30)["unacked"] == 0
        log = stack.log("worker")
        assert worker.poll() is None, log[-3000:]
        assert "Unrecoverable error" not in log
        for event in running:
            # Cancelled by the lost connection, put back and run again.
            assert stack.event(event["id"])["attempts"] == 2
        for student in (steve, maria, leo):
            assert stack.account(student)["kind"] == "grassroots"
            assert journal_entries(url, student) == 1
        assert dead_letters(url) == []
