"""The task base class (``worker.tasking.GrassrootsTask``) under real faults, with real processes: a
redis-server, PostgreSQL and ``grassroots worker`` processes, no eager mode. A warm shutdown, two
copies of one task at once, a task that kills its worker every time, a PostgreSQL
restart, a Redis connection drop and a permanent error: each ends with every event applied once,
or dead-lettered with what an operator needs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
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
from celery import Celery

from tests.support import scenario
from tests.support.databases import PgDatabases
from tests.support.faults import (
    blocked_conversion,
    children,
    deleted,
    journal_entries,
    lock_waiters,
    lock_waiting_processes,
    post_and_wait,
    row_lock,
    scalar,
    seed_copy,
)
from tests.support.scenario import Copy
from tests.support.stack import Stack, running_stack, spare_port, wait_until
from worker.migrate import upgrade
from worker.names import Queue, TaskName

pytestmark = pytest.mark.slow

STUDENTS = (scenario.STEVE, scenario.MARIA, scenario.LEO)


def dead_letters(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return list(cur.execute("SELECT * FROM dead_letters ORDER BY id"))


def task_ids_received(log: str, task_id: str) -> bool:
    return f"[{task_id}] received" in log


def outcomes(log: str, task_id: str) -> list[str]:
    """What each run of the task that finished in the worker's log returned."""
    found = []
    for line in log.splitlines():
        if task_id in line and line.startswith("{"):
            data = json.loads(line).get("data") or {}
            if data.get("id") == task_id and "return_value" in data:
                found.append(str(data["return_value"]))
    return found


# --------------------------------------------------------------------------------------------
# 1. SIGTERM: a warm shutdown


def test_sigterm_mid_task_finishes_the_task_then_exits(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    """SIGTERM to a worker whose child is mid-conversion: the worker takes nothing new, lets the
    conversion finish once its lock is released, acknowledges it and exits 0. An event posted
    meanwhile waits in its queue for the next worker, which processes it at once. Nothing waits
    for the visibility timeout (five minutes here) and nothing is left unacknowledged."""
    url = pg_databases.new()
    with running_stack(
        tmp_path,
        url,
        workers=0,
        LOCK_TIMEOUT_MS="60000",
        BROKER_VISIBILITY_TIMEOUT="300",
        TASK_TIME_LIMIT="120",  # the visibility timeout must cover it
    ) as stack:
        worker = stack.start_worker("first", concurrency=1)
        copy = seed_copy(stack, "a001")
        later = deleted(copy, "after-sigterm", scenario.MARIA)
        with blocked_conversion(stack, url, copy, "sigterm") as (steve, event):
            os.kill(worker.pid, signal.SIGTERM)  # the main process only, as an orchestrator does
            wait_until(
                lambda: "Warm shutdown" in stack.log("first"), timeout=10, what="warm shutdown"
            )
            assert stack.post(later).status_code == 202
            # Still there, waiting for its task, which has not failed or been given up.
            assert worker.poll() is None
            assert lock_waiters(url) == 1
            assert stack.event(event["id"])["status"] == "processing"
        wait_until(
            lambda: stack.event(event["id"])["status"] == "done",
            timeout=10,
            what="the conversion to finish after its lock was released",
        )
        assert worker.wait(timeout=20) == 0
        stack.procs.pop("first")
        # The message was acknowledged before the worker left: nothing for a restore to
        # redeliver. The later event was not taken: it waits in its queue.
        status = stack.status()
        assert status["unacked"] == 0 and status["queues"]["events"] == 1, status
        assert stack.event(later["id"])["status"] == "accepted"
        detail = stack.event(event["id"])
        assert detail["attempts"] == 1 and detail["dead_letters"] == []
        assert stack.account(steve)["kind"] == "grassroots"
        assert journal_entries(url, steve) == 1
        assert "WorkerLostError" not in stack.log("first")

        stack.start_worker("second", concurrency=1)
        wait_until(
            lambda: stack.event(later["id"])["status"] == "done",
            timeout=10,
            what="the next worker to process the waiting event",
        )
        assert stack.wait_idle(timeout=10)["unacked"] == 0
        assert stack.event(later["id"])["attempts"] == 1
        assert journal_entries(url, copy(scenario.MARIA)) == 1
        # The first event's task ran once, on the worker that was shutting down.
        task_id = scalar(url, "SELECT task_id FROM roster_events WHERE id = %s", event["id"])
        assert outcomes(stack.log("first"), task_id) == ["'done'"]
        assert outcomes(stack.log("second"), task_id) == []


# --------------------------------------------------------------------------------------------
# 2. Two copies of one task at once


def test_a_second_copy_of_a_running_task_runs_beside_it_and_does_nothing(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    """A second message for a conversion still held on a lock (as the relay sends when it
    misjudges a task lost, or kombu redelivers one it thinks abandoned), taken by the other
    worker: two copies of the task run at once. The second waits for the first's event row,
    finds the event done and does nothing. (A copy restored past the visibility timeout while
    the first still runs cannot happen: the worker refuses a visibility timeout that does not
    cover TASK_TIME_LIMIT.)"""
    url = pg_databases.new()
    with running_stack(tmp_path, url, workers=0, LOCK_TIMEOUT_MS="60000") as stack:
        stack.start_worker("first", concurrency=1)
        stack.start_worker("second", concurrency=1)
        copy = seed_copy(stack, "a002")
        sender = Celery("duplicate", broker=stack.redis.url)
        with blocked_conversion(stack, url, copy, "visibility") as (steve, event):
            task_id = scalar(url, "SELECT task_id FROM roster_events WHERE id = %s", event["id"])
            assert task_id
            # The same message again, as a redelivery is.
            sender.send_task(
                TaskName.PROCESS_EVENT, (event["id"],), queue=Queue.EVENTS, task_id=task_id
            )
            # The second copy runs on the other worker, and waits too.
            wait_until(
                lambda: lock_waiters(url) == 2,
                timeout=30,
                what="the second copy to run beside the first",
            )
            assert all(task_ids_received(stack.log(w), task_id) for w in ("first", "second"))
        wait_until(
            lambda: stack.event(event["id"])["status"] == "done",
            timeout=10,
            what="the event to be done",
        )
        stack.wait_idle(timeout=30)
        detail = stack.event(event["id"])
        # The second copy found the event done: it counted no attempt and changed nothing.
        assert detail["attempts"] == 1, detail
        runs = outcomes(stack.log("first"), task_id) + outcomes(stack.log("second"), task_id)
        assert sorted(runs) == ["'done'", "None"]
        assert stack.account(steve)["kind"] == "grassroots"
        assert journal_entries(url, steve) == 1
        assert dead_letters(url) == []


# --------------------------------------------------------------------------------------------
# 3. A task that kills its worker every time


def test_task_killing_its_worker_every_time_is_capped_and_dead_lettered(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    """``grassroots district exit``'s start task, SIGKILLed with its pool child each time it
    runs: its attempts, counted on its request before the work starts, reach
    TASK_MAX_RETRIES + 1, and the next delivery dead-letters it without working
    (``too_many_attempts``). Meanwhile the same worker processes an event of another district."""
    url = pg_databases.new()
    with running_stack(
        tmp_path, url, workers=0, LOCK_TIMEOUT_MS="60000", TASK_MAX_RETRIES="2"
    ) as stack:
        worker = stack.start_worker("worker", concurrency=2)
        exiting, other = seed_copy(stack, "a003"), seed_copy(stack, "a013")
        district = exiting(scenario.DISTRICT)
        later = deleted(other, "meanwhile", scenario.STEVE)

        def attempts() -> int:
            found = scalar(url, "SELECT attempts FROM operator_requests WHERE kind = 'exit'")
            return int(found or 0)

        with row_lock(url, "districts", district):
            stack.cli("district", "exit", district)
            for n in (1, 2, 3):
                running = wait_until(
                    lambda n=n: (  # type: ignore[misc]
                        attempts() == n and lock_waiting_processes(url, children(worker.pid))
                    ),
                    timeout=30,
                    what=f"attempt {n} to start",
                )
                (child,) = running
                os.kill(child, signal.SIGKILL)
                if n == 1:
                    # Work beside it goes on: the other child converts another district's student.
                    assert stack.post(later).status_code == 202
                    wait_until(
                        lambda: stack.event(later["id"])["status"] == "done",
                        timeout=30,
                        what="the other event to be processed",
                    )
            letters = wait_until(lambda: dead_letters(url), timeout=30, what="the dead letter")
            assert attempts() == 4
            # The fourth delivery did not start the work. (The killed children's backends wait
            # on: Postgres notices a client gone only when it next writes to it.)
            assert lock_waiting_processes(url, children(worker.pid)) == []
        (letter,) = letters
        request_id = scalar(url, "SELECT id FROM operator_requests WHERE kind = 'exit'")
        assert letter["task"] == "grassroots.district_exit"
        assert letter["subject"] == f"request:{request_id}"
        assert letter["event_id"] is None
        assert letter["args"] == {"district_id": district, "request_id": request_id}
        assert scalar(url, "SELECT status FROM operator_requests") == "dead"
        assert letter["reason"] == "too_many_attempts"
        assert letter["exception"] == "RuntimeError"
        assert letter["error"] == (
            "started 3 times without finishing (its process ended each time: killed, or stopped"
            " at TASK_TIME_LIMIT)"
        )
        assert "RuntimeError: started 3 times without finishing" in letter["traceback"]
        assert letter["attempts"] == 4
        assert letter["host"] == socket.gethostname()
        assert letter["first_failed_at"] is not None and letter["last_failed_at"] is not None
        assert letter["resolved_at"] is None
        assert stack.log("worker").count("WorkerLostError") >= 3
        # Given up: once its lock is gone, nothing runs the exit.
        stack.wait_idle(timeout=30)
        assert scalar(url, "SELECT status FROM districts WHERE id = %s", district) == "active"
        assert scalar(url, "SELECT count(*) FROM district_exits") == 0
        # The other event, and only it, was applied.
        assert stack.account(other(scenario.STEVE))["kind"] == "grassroots"
        assert journal_entries(url, other(scenario.STEVE)) == 1
        assert stack.account(exiting(scenario.STEVE))["kind"] == "district"
        assert worker.poll() is None


# --------------------------------------------------------------------------------------------
# 4. A PostgreSQL restart


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
# 5. Redis connections dropped during a long task


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


# --------------------------------------------------------------------------------------------
# 6. A permanent error


def test_permanent_error_is_dead_lettered_at_once_without_retries(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    """A conversion refused by the database (a trigger raising on the account's update): not
    transient, so no short retry and no Celery retry; the event is dead after one attempt, and
    its dead letter says what failed, where and how."""
    url = pg_databases.new()
    with running_stack(tmp_path, url, workers=0) as stack:
        stack.start_worker("worker", concurrency=1)
        copy = seed_copy(stack, "a006")
        steve = copy(scenario.STEVE)
        with psycopg.connect(url) as conn:
            conn.execute(
                "CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'account frozen by the test'; END $$"
            )
            conn.execute(
                f"CREATE TRIGGER frozen BEFORE UPDATE ON accounts FOR EACH ROW"
                f" WHEN (OLD.id = '{steve}') EXECUTE FUNCTION refuse_update()"
            )
        event = deleted(copy, "refused", scenario.STEVE)
        assert stack.post(event).status_code == 202
        wait_until(
            lambda: stack.event(event["id"])["status"] == "dead", timeout=30, what="dead letter"
        )
        detail = stack.event(event["id"])
        assert detail["attempts"] == 1
        (letter,) = dead_letters(url)
        assert letter["event_id"] == event["id"]
        assert letter["task"] == "grassroots.process_event"
        assert letter["reason"] == "error"
        assert letter["exception"] == "RaiseException"
        assert letter["error"] == "account frozen by the test"
        assert letter["traceback"].startswith("Traceback (most recent call last):")
        assert "RaiseException: account frozen by the test" in letter["traceback"]
        assert letter["attempts"] == 1
        assert letter["host"] == socket.gethostname()
        assert stack.account(steve)["kind"] == "district"
        assert journal_entries(url, steve) == 0
        log = stack.log("worker")
        assert "dead-lettered grassroots.process_event: error (RaiseException)" in log
        assert "retrying" not in log and "Retry in" not in log
        # Nothing left in flight: not retried later either.
        assert stack.wait_idle(timeout=10)["unacked"] == 0


# --------------------------------------------------------------------------------------------
# 7. Time limits


def test_tasks_stopped_at_their_time_limits_are_sent_again_and_finish(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    """TASK_TIME_LIMIT=60 (its least), the retries at their defaults, lock waits long enough to
    outlast the limit. A conversion blocked on a row lock for 75 s: its soft limit (30 s before
    the hard one) ends each attempt, which is sent again; it is done soon after the lock is
    gone. Another, whose pool child hangs (stopped: the soft limit cannot reach it): at the hard
    limit the child is ended and the message put back, not acknowledged, and the next attempt
    converts. Each attempt is counted; nothing is dead-lettered."""
    url = pg_databases.new()
    with running_stack(
        tmp_path,
        url,
        workers=0,
        TASK_TIME_LIMIT="60",
        RETRY_BACKOFF_MAX="600",
        LOCK_TIMEOUT_MS="600000",
    ) as stack:
        worker = stack.start_worker("worker", concurrency=2)
        copy = seed_copy(stack, "a007")
        with blocked_conversion(stack, url, copy, "hung", scenario.MARIA) as (maria, hung):
            (child,) = lock_waiting_processes(url, children(worker.pid))
            os.kill(child, signal.SIGSTOP)
        hung_at = time.monotonic()
        with blocked_conversion(stack, url, copy, "blocked", scenario.STEVE) as (steve, blocked):
            wait_until(
                lambda: "Hard time limit (60" in stack.log("worker"),
                timeout=90,
                what="the hung child's hard time limit",
            )
            assert time.monotonic() - hung_at >= 55
            wait_until(
                lambda: stack.event(hung["id"])["status"] == "done",
                timeout=30,
                what="the hung conversion, sent again, to be done",
            )
            # Blocked for 75 s, longer than the time limit.
            time.sleep(max(0.0, 75 - (time.monotonic() - hung_at)))
            assert stack.event(blocked["id"])["status"] == "processing"
            log = stack.log("worker")
            assert "Soft time limit (30" in log
            # Ended and sent again, not tried again in the process the limit stopped.
            assert "SoftTimeLimitExceeded" in log and "retrying grassroots.process_event" in log
        released = time.monotonic()
        wait_until(
            lambda: stack.event(blocked["id"])["status"] == "done",
            timeout=30,
            what="the blocked conversion to be done once its lock is gone",
        )
        assert time.monotonic() - released < 15
        assert stack.event(hung["id"])["attempts"] == 2
        assert 2 <= stack.event(blocked["id"])["attempts"] <= 4
        for student in (maria, steve):
            assert stack.account(student)["kind"] == "grassroots"
            assert journal_entries(url, student) == 1
        assert dead_letters(url) == []
        assert stack.wait_idle(timeout=15)["unacked"] == 0
        assert worker.poll() is None
