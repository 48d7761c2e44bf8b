"""The task base class (``worker.tasking.GrassrootsTask``) under real faults of the task or its
worker, with real processes: a redis-server, PostgreSQL and ``grassroots worker`` processes, no
eager mode. A warm shutdown, two copies of one task at once, a task that kills its worker every
time, a permanent error and the time limits: each ends with every event applied once, or
dead-lettered with what an operator needs. PostgreSQL and Redis going away are in
``test_worker_outages.py``.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import psycopg
import pytest
from celery import Celery

from tests.support import scenario
from tests.support.databases import PgDatabases
from tests.support.faults import (
    blocked_conversion,
    children,
    dead_letters,
    deleted,
    journal_entries,
    lock_waiters,
    lock_waiting_processes,
    outcomes,
    row_lock,
    scalar,
    seed_copy,
)
from tests.support.stack import running_stack, wait_until
from worker.names import Queue, TaskName

pytestmark = pytest.mark.slow


def task_ids_received(log: str, task_id: str) -> bool:
    return f"[{task_id}] received" in log


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
# 4. A permanent error


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
# 5. Time limits


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
