"""The ops API's pipeline status, SPEC §5.5: events pending, dead and held, final events of the
last day, queue depths read from a live broker and tasks in flight.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from models import DeadLetter, RosterEvent, utcnow
from tests.support.app_env import Configure
from tests.support.ops_api import AUTH, LIVE_BROKER, TOKEN, get
from tests.support.stack import RedisServer
from worker import db
from worker.api import app
from worker.celery_app import QUEUES
from worker.celery_app import app as celery_app

# --------------------------------------------------------------------------------------------
# Pipeline status


def test_status_counts_pending_dead_and_held_events(inbox: TestClient) -> None:
    # The dead event's dead letter, and an exit unit's: `dead` counts every open dead letter.
    with db.session_scope() as session:
        for event_id, subject, task in (
            ("evt-d", "event:evt-d", "grassroots.process_event"),
            (None, "exit_unit:7:teacher:t1", "grassroots.exit_unit"),
        ):
            session.add(
                DeadLetter(event_id=event_id, subject=subject, task=task, reason="error", error="x")
            )
    response = get(inbox, "/ops/status")

    assert response.status_code == 200
    body = response.json()
    # Two accepted events are in flight; the broker is down, so no queue adds to that.
    assert (body["pending"], body["dead"], body["held"]) == (2, 2, 1)
    assert body["events_dead"] == 1
    assert body["queues"] == dict.fromkeys(QUEUES, 0)
    assert body["broker"].startswith("unavailable")


def test_status_counts_what_waits_however_old_and_final_events_of_the_last_day(
    client: TestClient,
) -> None:
    # Its cost follows what is open, not the inbox's history: final events count only while
    # received within the last 24 h.
    now = utcnow()
    with db.session_scope() as session:
        for event_id, status, age in (
            ("old-done", "done", timedelta(days=2)),
            ("old-dead", "dead", timedelta(days=40)),
            ("old-accepted", "accepted", timedelta(days=3)),
            ("new-done", "done", timedelta(hours=1)),
            ("new-ignored", "ignored", timedelta(hours=23)),
        ):
            at = now - age
            session.add(
                RosterEvent(
                    id=event_id,
                    type="users.updated",
                    payload={},
                    status=status,
                    received_at=at,
                    updated_at=at,
                )
            )

    body = get(client, "/ops/status").json()

    assert body["events"] == {"accepted": 1, "dead": 1, "done": 1, "ignored": 1}
    assert body["events_dead"] == 1 and body["pending"] == 1
    since = datetime.fromisoformat(body["events_final_since"])
    assert timedelta(hours=23, minutes=59) < now - since < timedelta(hours=24, minutes=1)


def test_status_reads_queue_depths_from_a_live_broker(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=LIVE_BROKER, OPS_TOKEN=TOKEN)
    with TestClient(app, headers=AUTH) as client:
        response = get(client, "/ops/status")

    assert response.status_code == 200
    body = response.json()
    assert body["broker"] == "ok"
    assert set(body["queues"]) == set(QUEUES)
    assert all(isinstance(depth, int) and depth >= 0 for depth in body["queues"].values())
    assert body["pending"] <= sum(body["queues"].values()) + body["unacked"]
    assert (body["dead"], body["held"]) == (0, 0)


def test_status_counts_tasks_in_flight_but_not_the_periodic_housekeeping(
    configure: Configure, database_url: str, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        configure(DATABASE_URL=database_url, BROKER_URL=redis.url, OPS_TOKEN=TOKEN)
        with TestClient(app, headers=AUTH) as client:
            assert get(client, "/ops/status").json()["pending"] == 0
            celery_app.send_task("grassroots.poll")  # routed to the maintenance queue
            celery_app.send_task("grassroots.purge")
            celery_app.send_task("grassroots.finish_exit", (1,))  # the fanout queue
            with celery_app.connection_for_write() as conn:
                channel: Any = conn.default_channel
                taken = channel.basic_get("maintenance", no_ack=False)  # a worker runs it
                assert taken is not None
                body = get(client, "/ops/status").json()
                assert body["queues"] == {**dict.fromkeys(QUEUES, 0), "maintenance": 1, "fanout": 1}
                assert body["unacked"] == 1
                assert body["pending"] == 1  # the exit's task, and nothing else

                fanout = channel.basic_get("fanout", no_ack=False)
                assert fanout is not None
                body = get(client, "/ops/status").json()
                assert (body["unacked"], body["pending"]) == (2, 1)
                fanout.ack()
                taken.ack()
            assert get(client, "/ops/status").json()["pending"] == 0
    finally:
        redis.stop()
