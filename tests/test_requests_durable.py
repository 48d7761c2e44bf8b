"""Durable requests (SPEC §6): an operator request that starts work is written to SQL before
anything is sent, the relay sends what the broker did not take, and a task acts only on what
such a row asks for. Real Redis, Postgres, worker and beat processes."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.support.databases import PgDatabases
from tests.support.fake_clever import FakeClever
from tests.support.scenario import DISTRICT, STEVE, example
from tests.support.stack import Stack, clever_event, running_stack, wait_until

TOKEN = "district-token-1"
T0 = "2025-09-03T14:05:21.900Z"
REFUSED = "refused a message that no exit request asks for; nothing done"

pytestmark = pytest.mark.slow


def roster_file(tmp_path: Path) -> Path:
    path = tmp_path / "district.json"
    path.write_text(json.dumps(example()))
    return path


def lose_what_is_queued(stack: Stack, queue: str) -> None:
    """The broker loses every message after the request was answered (a Redis that restarted
    without its data): nothing has consumed the request's message yet."""
    with redis.Redis.from_url(stack.redis.url) as client:
        assert client.llen(queue) == 1, f"the request's message is not waiting in {queue}"
        client.flushall()


def exit_status(stack: Stack) -> str | None:
    answer = stack.ops("GET", f"/ops/districts/{DISTRICT}/exit")
    return str(answer.json()["status"]) if answer.status_code == 200 else None


def test_an_exit_whose_start_message_is_lost_runs_to_done_and_wait_gives_up_naming_it(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    url = pg_databases.new()
    with running_stack(tmp_path, url, seed=roster_file(tmp_path), workers=0) as stack:
        # No worker yet: --wait gives up at its time limit and says what it waited for.
        waited = stack.cli("district", "exit", DISTRICT, "--wait", "--timeout", "2", check=False)
        assert waited.returncode == 1, waited.stdout
        assert waited.stderr.strip() == (
            f"grassroots: district {DISTRICT}: gave up waiting after 2s for the exit to start"
            " (no worker has taken it: is one running?); it starts without this command"
        )
        lose_what_is_queued(stack, "fanout")

        stack.start_beat()
        stack.start_worker("worker0")
        wait_until(lambda: exit_status(stack) == "done", timeout=120, what="the exit to be done")
        assert stack.account(STEVE)["kind"] == "grassroots"
        assert "sent 1 request(s) again" in stack.log("beat")


def test_a_sync_whose_message_is_lost_runs_to_done(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    url = pg_databases.new()
    with FakeClever() as clever:
        clever.roster(DISTRICT, TOKEN, example())
        clever.remove_users(DISTRICT, STEVE)  # Clever no longer lists him
        with running_stack(
            tmp_path,
            url,
            seed=roster_file(tmp_path),
            workers=0,
            CLEVER_API_BASE=clever.url,
            CLEVER_DISTRICT_TOKENS=f"{DISTRICT}:{TOKEN}",
            SYNC_INTERVAL="0",
        ) as stack:
            answer = stack.ops("POST", f"/ops/districts/{DISTRICT}/sync")
            assert answer.status_code == 202, answer.text
            sync_id = answer.json()["sync_id"]
            lose_what_is_queued(stack, "maintenance")

            stack.start_beat()
            stack.start_worker("worker0")

            def last_sync() -> dict[str, Any] | None:
                report = stack.ops("GET", f"/ops/districts/{DISTRICT}/sync").json()
                return report if report["status"] != "running" else None

            report = wait_until(last_sync, timeout=120, what="the sync to finish")
            assert report is not None
            assert (report["sync_id"], report["status"]) == (sync_id, "done")
            assert report["changes"]["users_deleted"] == 1
            wait_until(
                lambda: stack.account(STEVE)["kind"] == "grassroots",
                timeout=60,
                what="the removal the sync recorded, applied",
            )


def test_a_replay_whose_message_is_lost_runs_to_done(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    url = pg_databases.new()
    with running_stack(tmp_path, url, seed=roster_file(tmp_path), workers=0) as stack:
        removal = clever_event(
            "replay-1", "users.deleted", {"id": STEVE, "district": DISTRICT}, created=T0
        )
        assert stack.post(removal).status_code == 202
        # It died (as if its retries ran out) before any worker ran it: its message is gone.
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE roster_events SET status = 'dead' WHERE id = 'replay-1'")
        with redis.Redis.from_url(stack.redis.url) as client:
            wait_until(lambda: client.llen("events") == 1, what="the receiver's send")
            client.flushall()

        stack.cli("events", "replay", "replay-1")
        lose_what_is_queued(stack, "events")

        stack.start_beat()
        stack.start_worker("worker0")
        wait_until(
            lambda: stack.event("replay-1")["status"] == "done",
            timeout=120,
            what="the replayed event to be done",
        )
        assert stack.account(STEVE)["kind"] == "grassroots"


def forge(client: redis.Redis, queue: str, task: str, args: list[Any]) -> str:
    """A task message pushed onto a queue by hand, as Celery's protocol 2 and kombu's Redis
    transport store one (what anyone who can write to the Redis could do). Its task id."""
    task_id = str(uuid.uuid4())
    body = [args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    message = {
        "body": base64.b64encode(json.dumps(body).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "timelimit": [None, None],
            "argsrepr": repr(tuple(args)),
            "kwargsrepr": "{}",
            "origin": "someone@elsewhere",
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    client.lpush(queue, json.dumps(message))
    return task_id


def refusals(stack: Stack) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in stack.log("worker0").splitlines() if line[:1] == "{")
    return [line for line in lines if line.get("msg") == REFUSED]


def test_a_forged_exit_message_changes_nothing_and_is_logged_as_refused(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    url = pg_databases.new()
    with running_stack(tmp_path, url, seed=roster_file(tmp_path)) as stack:
        with redis.Redis.from_url(stack.redis.url) as client:
            forged = [
                # The shape the start had before it was a request: a district and a trigger.
                forge(client, "fanout", "grassroots.district_exit", [DISTRICT, "mallory@x.test"]),
                # A request id that looks right, which no row has.
                forge(client, "fanout", "grassroots.district_exit", [DISTRICT, uuid.uuid4().hex]),
            ]
        wait_until(lambda: len(refusals(stack)) == 2, timeout=60, what="both refused")
        lines = refusals(stack)
        assert sorted(line["task_id"] for line in lines) == sorted(forged)
        assert all(line["level"] == "warning" for line in lines)
        assert "mallory" not in stack.log("worker0")
        stack.wait_idle()
        assert exit_status(stack) is None
        assert stack.account(STEVE)["kind"] == "district"
        preview = stack.ops("GET", f"/ops/districts/{DISTRICT}/preview").json()
        assert preview["status"] == "active"
        # A real request still starts the exit.
        assert stack.ops("POST", f"/ops/districts/{DISTRICT}/exit").status_code == 202
        wait_until(lambda: exit_status(stack) == "done", timeout=120, what="the real exit")
        assert stack.account(STEVE)["kind"] == "grassroots"
