"""Faults injected from outside the code: killed workers, a broker that goes away, a row lock held
by another transaction. Each test runs its own stack with its own redis-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.support import scenario
from tests.support.databases import PgDatabases
from tests.support.faults import (
    T0,
    blocked_conversion,
    children,
    deleted,
    journal_entries,
    row_lock,
    seed_copy,
)
from tests.support.stack import clever_event, running_stack, wait_until
from worker.settings import Settings

pytestmark = pytest.mark.slow
DEFAULT_MAX_RETRIES = Settings.model_fields["task_max_retries"].default
MAKE_DISTRICT = Path(__file__).resolve().parents[1] / "bench" / "make_district.py"


def test_worker_child_killed_mid_conversion_is_redelivered_and_applied_once(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    url = pg_databases.new()
    with running_stack(tmp_path, url, workers=0, LOCK_TIMEOUT_MS="60000") as stack:
        worker = stack.start_worker("worker", concurrency=1)
        with blocked_conversion(stack, url, seed_copy(stack, "f001"), "kill-child") as (
            steve,
            event,
        ):
            (child,) = children(worker.pid)
            os.kill(child, signal.SIGKILL)
            wait_until(
                lambda: children(worker.pid) and children(worker.pid) != [child],
                what="a replacement child",
            )
        wait_until(lambda: stack.event(event["id"])["status"] == "done", what="redelivery")
        assert stack.event(event["id"])["attempts"] == 2
        assert stack.account(steve)["kind"] == "grassroots"
        assert journal_entries(url, steve) == 1
        assert "WorkerLostError" in stack.log("worker")


def test_whole_worker_killed_mid_conversion_its_task_is_put_back_and_applied_once(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    # The killed worker's message waits in Redis as unacknowledged; kombu alone would put it back
    # after the visibility timeout (an hour), and the relay would send the event again after the
    # longest retry countdown (10 minutes here). The relay puts it back once no live worker
    # holds it, and the pipeline goes idle.
    url = pg_databases.new()
    with running_stack(
        tmp_path, url, workers=0, beat=True, LOCK_TIMEOUT_MS="60000", RETRY_BACKOFF_MAX="600"
    ) as stack:
        stack.start_worker("first", concurrency=1)
        with blocked_conversion(stack, url, seed_copy(stack, "f005"), "kill-worker") as (
            steve,
            event,
        ):
            stack.kill("first")
        stack.start_worker("second", concurrency=1)
        wait_until(
            lambda: stack.event(event["id"])["status"] == "done",
            timeout=60,
            what="the event, put back, to be processed",
        )
        assert stack.wait_idle(timeout=30)["unacked"] == 0
        assert stack.event(event["id"])["attempts"] == 2
        assert stack.account(steve)["kind"] == "grassroots"
        assert journal_entries(url, steve) == 1
        assert "put back 1 task(s) a lost worker had taken" in stack.log("beat")


def test_whole_worker_killed_mid_district_exit_is_finished_by_a_new_worker(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    url = pg_databases.new()
    roster = tmp_path / "district.json"
    # The benchmarks' generator, run as the program it is: nothing imports bench/.
    subprocess.run(
        [
            sys.executable,
            str(MAKE_DISTRICT),
            *("--students", "3000", "--teachers", "120", "--seed", "7", "--out", str(roster)),
        ],
        check=True,
        capture_output=True,
    )
    district = json.loads(roster.read_text())
    district_id = district["districts"][0]["id"]
    with running_stack(
        tmp_path,
        url,
        seed=roster,
        workers=0,
        beat=True,
        EXIT_BATCH_SIZE="100",
    ) as stack:
        stack.start_worker("first", concurrency=2)
        exit_event = clever_event("exit-1", "districts.deleted", {"id": district_id}, created=T0)
        assert stack.post(exit_event).status_code == 202

        def halfway() -> bool:
            found = stack.ops("GET", f"/ops/districts/{district_id}/exit")
            if found.status_code != 200:
                return False
            progress = found.json()
            return bool(0 < progress["units_done"] < progress["units_total"] * 0.7)

        wait_until(halfway, what="the exit to be under way")
        stack.kill("first")
        stack.start_worker("second", concurrency=2)
        wait_until(
            lambda: (
                stack.ops("GET", f"/ops/districts/{district_id}/exit").json()["status"] == "done"
            ),
            timeout=120,
            what="the exit to finish",
        )
        stack.wait_idle(timeout=60)
    with psycopg.connect(url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM accounts WHERE district_id = %s", (district_id,)
        ).fetchone()
        doubled = conn.execute(
            "SELECT count(*) FROM (SELECT account_id FROM conversion_journal"
            " WHERE kind = 'account' GROUP BY account_id HAVING count(*) > 1) d"
        ).fetchone()
        converted = conn.execute(
            "SELECT count(*) FROM conversion_journal WHERE kind = 'account'"
        ).fetchone()
        live_synced = conn.execute(
            "SELECT count(*) FROM classes WHERE district_synced AND removed_by IS NULL"
        ).fetchone()
        users = len(district["users"])
    assert left == (0,) and doubled == (0,) and live_synced == (0,)
    assert converted == (users,)


def test_events_sent_while_redis_is_down_are_all_processed_when_it_returns(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    url = pg_databases.new()
    with running_stack(tmp_path, url, beat=True) as stack:
        copy = seed_copy(stack, "f002")
        people = [scenario.STEVE, scenario.MARIA, scenario.LEO]
        events = [deleted(copy, f"down-{n}", who) for n, who in enumerate(people)]
        stack.redis.stop()
        answers = [stack.post(e) for e in events]
        assert [a.status_code for a in answers] == [202, 202, 202]
        assert all(a.json()["status"] == "accepted" for a in answers)
        assert stack.ops("GET", "/readyz").status_code == 503
        stack.redis.start()

        def all_done() -> bool:
            return all(stack.event(e["id"])["status"] == "done" for e in events)

        wait_until(all_done, timeout=90, what="every event processed after Redis returned")
        for who in people:
            assert stack.account(copy(who))["kind"] == "grassroots"
            assert journal_entries(url, copy(who)) == 1


def test_locked_row_retries_then_dead_letters_and_replay_converts(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    """A row kept locked, at the shipped TASK_MAX_RETRIES (only the backoff shortened): the
    event is tried TASK_MAX_RETRIES + 1 times (past Celery's own default of three retries), then
    it is a dead letter naming the lock error, not a message acknowledged with its event left
    processing. Replay sends it round again: failing, it is dead again with a fresh budget of
    attempts; once the lock is gone, it converts."""
    url = pg_databases.new()
    most = DEFAULT_MAX_RETRIES + 1
    with running_stack(tmp_path, url, LOCK_TIMEOUT_MS="100", RETRY_BACKOFF_MAX="1") as stack:
        copy = seed_copy(stack, "f003")
        steve = copy(scenario.STEVE)
        event = deleted(copy, "locked", scenario.STEVE)
        with row_lock(url, "accounts", steve):
            assert stack.post(event).status_code == 202
            wait_until(
                lambda: stack.event(event["id"])["status"] == "dead",
                timeout=120,
                what="dead letter",
            )
            detail = stack.event(event["id"])
            assert detail["attempts"] == most
            (letter,) = detail["dead_letters"]
            assert letter["reason"] == "retries_exhausted" and letter["attempts"] == most
            assert "lock timeout" in letter["error"]
            assert "LockNotAvailable" in letter["traceback"]
            assert stack.account(steve)["kind"] == "district"
            assert [
                e["id"] for e in stack.cli_json("events", "list", "--status", "dead", "--json")
            ] == [event["id"]]
            # a replay that fails again returns to the dead letters with its count raised
            stack.cli("events", "replay", event["id"])
            wait_until(
                lambda: stack.event(event["id"])["dead_letters"][0]["attempts"] == 2 * most,
                timeout=120,
                what="the second failure",
            )
            assert stack.event(event["id"])["status"] == "dead"
        stack.cli("events", "replay", "--status", "dead")
        wait_until(lambda: stack.event(event["id"])["status"] == "done", what="replay applied")
        assert stack.account(steve)["kind"] == "grassroots"
        assert journal_entries(url, steve) == 1
        again = stack.cli("events", "replay", event["id"])
        assert "already applied" in again.stdout
        assert journal_entries(url, steve) == 1
        # No failure escaped to Celery (which would acknowledge the message as failed).
        assert "raised unexpected" not in stack.log("worker0")


def unit_row(database_url: str, key: str) -> tuple[str, int] | None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, attempts FROM exit_units WHERE key = %s", (key,)
        ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def test_a_teacher_unit_held_up_by_a_class_lock_retries_and_the_exit_finishes(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    """The teacher unit's attempt count and statement share a round trip: its failure on a held
    lock keeps the count, goes through the retries (more than Celery's own default of three, at
    the shipped TASK_MAX_RETRIES), and the unit runs once the lock is gone."""
    url = pg_databases.new()
    with running_stack(tmp_path, url, LOCK_TIMEOUT_MS="100", RETRY_BACKOFF_MAX="1") as stack:
        copy = seed_copy(stack, "f004")
        district, kim = copy(scenario.DISTRICT), copy(scenario.KIM)
        key = f"teacher:{kim}"
        with psycopg.connect(url) as holder:
            classes = [
                row[0]
                for row in holder.execute(
                    "SELECT classes.id FROM classes JOIN class_teachers"
                    " ON class_teachers.class_id = classes.id"
                    " WHERE class_teachers.teacher_id = %s AND classes.district_id = %s",
                    (kim, district),
                )
            ]
            assert classes
            holder.execute("SELECT id FROM classes WHERE id = ANY(%s) FOR UPDATE", (classes,))
            stack.cli("district", "exit", district)
            wait_until(
                lambda: (unit_row(url, key) or ("", 0))[1] >= 5,
                what="the unit to be retried four times",
            )
            status, _ = unit_row(url, key) or ("", 0)
            assert status == "pending"
            holder.rollback()
        wait_until(
            lambda: stack.ops("GET", f"/ops/districts/{district}/exit").json()["status"] == "done",
            what="the exit to finish",
        )
        status, attempts = unit_row(url, key) or ("", 0)
        assert status == "done" and 5 <= attempts <= DEFAULT_MAX_RETRIES + 1
        with psycopg.connect(url) as conn:
            live = conn.execute(
                "SELECT count(*) FROM classes WHERE id = ANY(%s) AND removed_by IS NULL",
                (classes,),
            ).fetchone()
            letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
        assert live == (0,) and letters == (0,)
        assert stack.account(kim)["kind"] == "grassroots"


def test_a_dead_teacher_unit_stalls_the_exit_visibly_and_resume_finishes_it(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    """The unit that outlasts its retries is dead, not waited on forever: `--wait` ends with
    status 1 naming it, `status` and the exit's progress show it, and `district
    resume` sends it again by the same key once the lock is gone."""
    url = pg_databases.new()
    with running_stack(
        tmp_path, url, LOCK_TIMEOUT_MS="100", TASK_MAX_RETRIES="1", RETRY_BACKOFF_MAX="1"
    ) as stack:
        copy = seed_copy(stack, "f006")
        district, kim = copy(scenario.DISTRICT), copy(scenario.KIM)
        key = f"teacher:{kim}"
        with psycopg.connect(url) as holder:
            holder.execute(
                "SELECT classes.id FROM classes JOIN class_teachers"
                " ON class_teachers.class_id = classes.id"
                " WHERE class_teachers.teacher_id = %s AND classes.district_id = %s"
                # Only the classes she alone teaches: a co-taught one would stall her
                # co-teacher's unit too, and `--wait` names the first unit that dies.
                " AND NOT EXISTS (SELECT 1 FROM class_teachers other"
                " WHERE other.class_id = classes.id AND other.teacher_id <> %s)"
                " FOR UPDATE OF classes",
                (kim, district, kim),
            )
            waited = stack.cli("district", "exit", district, "--wait", check=False)
            assert waited.returncode == 1, waited.stderr
            assert f"dead unit(s) {key}" in waited.stderr
            assert f"grassroots district resume {district}" in waited.stderr

            progress = stack.ops("GET", f"/ops/districts/{district}/exit").json()
            assert progress["status"] == "stalled"
            assert (progress["units_dead"], progress["dead_units"]) == (1, [key])
            # Her co-teacher's unit is done; the account batch waits for every teacher's.
            assert progress["units_done"] == progress["units_total"] - 2
            status = stack.status()
            assert status["exit_units_dead"] == 1 and status["dead"] == 1
            with psycopg.connect(url) as conn:
                letter = conn.execute(
                    "SELECT task, reason, exception, attempts, host, traceback,"
                    " first_failed_at <= last_failed_at FROM dead_letters WHERE subject = %s",
                    (f"exit_unit:{progress['exit']}:{key}",),
                ).fetchone()
            assert letter is not None
            task, reason, exception, attempts, host, traceback, ordered = letter
            assert (task, reason, attempts) == ("grassroots.exit_unit", "retries_exhausted", 2)
            assert exception == "LockNotAvailable" and host and ordered
            assert "LockNotAvailable" in traceback
            # Kim's district classes are still live: nothing of the unit was half-applied.
            assert stack.account(kim)["kind"] == "district"
            holder.rollback()

        resumed = stack.cli("district", "resume", district, "--wait")
        assert f"resumed ({key})" in resumed.stdout
        assert f"district {district} exited" in resumed.stdout
        assert unit_row(url, key) == ("done", 1)
        assert stack.account(kim)["kind"] == "grassroots"
        done = stack.ops("GET", f"/ops/districts/{district}/exit").json()
        assert (done["status"], done["units_dead"], done["dead_units"]) == ("done", 0, [])
        assert (stack.status()["dead"], stack.status()["exit_units_dead"]) == (0, 0)
        # Resuming a finished exit is refused, with the reason.
        again = stack.cli("district", "resume", district, check=False)
        assert again.returncode == 1 and "nothing to resume" in again.stderr
