"""A Redis that stops answering without closing its connections (paused, failing over) hangs
nothing: the receiver still answers webhooks at once and leaves them for the relay, an operator's
exit is refused with 503 within seconds, and the receiver still shuts down. Sends to Redis are
bounded by socket timeouts (``worker.celery_app``)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.databases import PgDatabases
from tests.support.scenario import DISTRICT, EXAMPLE, STEVE
from tests.support.stack import Stack, clever_event, running_stack, terminate_group
from worker.celery_app import SEND_SOCKET_TIMEOUT, WORKER_SOCKET_TIMEOUT, app

pytestmark = pytest.mark.slow

# Longer than anything here may take with the timeouts, far shorter than without them.
PAUSE_MS = 30_000


def pause(stack: Stack) -> None:
    """Pause every client of the stack's Redis for ``PAUSE_MS``: connections stay open, no
    command is answered (no client can end the pause early: it expires on its own)."""
    with redis.Redis.from_url(stack.redis.url) as client:
        client.execute_command("CLIENT", "PAUSE", str(PAUSE_MS), "ALL")


def deleted(event_id: str) -> dict[str, object]:
    return clever_event(
        event_id,
        "users.deleted",
        {"id": STEVE, "district": DISTRICT, "roles": {"student": {}}},
        created="2025-09-03T14:05:21.900Z",
    )


def timed(call: object) -> tuple[httpx.Response, float]:
    assert callable(call)
    started = time.monotonic()
    response = call()
    assert isinstance(response, httpx.Response)
    return response, time.monotonic() - started


def test_sends_to_redis_are_bounded_by_socket_timeouts() -> None:
    options = app.conf.broker_transport_options
    assert options["socket_timeout"] == options["socket_connect_timeout"] == SEND_SOCKET_TIMEOUT
    # A worker waits on Redis's answers longer than a sender does; kombu's BRPOP (1 s on the
    # server) is read only once its socket is readable, so no timeout cuts a wait for work.
    assert WORKER_SOCKET_TIMEOUT > SEND_SOCKET_TIMEOUT > 0


def test_a_paused_redis_hangs_neither_the_receiver_nor_an_operator(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    with running_stack(tmp_path, pg_databases.new(), seed=Path(str(EXAMPLE)), workers=0) as stack:
        pause(stack)
        answer, took = timed(lambda: stack.post(deleted("paused-1")))
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"event": "paused-1", "status": "accepted"}
        assert took < 2

        refused, took = timed(lambda: stack.ops("POST", f"/ops/districts/{DISTRICT}/exit"))
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "broker_unavailable"
        assert took < 8

        # Committed, and left for the relay: nothing reached the broker.
        assert stack.event("paused-1")["status"] == "accepted"

        # A webhook whose send is still waiting on Redis does not hold the shutdown up
        # until Redis answers again.
        assert stack.post(deleted("paused-2")).status_code == 202
        serve = stack.procs.pop("serve")
        if not terminate_group(serve, within=12):
            raise AssertionError("the receiver did not stop while Redis was paused")
        assert "paused-2" in stack.cli("events", "list", "--json").stdout
