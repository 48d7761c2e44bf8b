"""The pipeline's status (``grassroots status``, ``GET /ops/status``): the database's backlog and
the broker's queues, in one object (SPEC §5.6)."""

from __future__ import annotations

from typing import Any

import redis
from sqlalchemy.orm import Session

from models import EventStatus, utcnow
from tasks.status import (
    FINAL_WINDOW,
    SYNC_LOOKBACK,
    backlog,
    districts_needing_attention,
    final_since,
)
from worker.broker import broker_client, count_task, queue_depths, unacked_in
from worker.celery_app import QUEUES
from worker.names import Queue, TaskName


def pipeline_status(
    session: Session, *, with_broker: bool = True, with_finals: bool = True
) -> dict[str, Any]:
    """``pending`` is 0 only when nothing is in flight: no event waiting or being processed, no
    exit unit left, no task queued or running.

    Its cost follows what is open, not the history: ``events`` counts each open status over the
    whole inbox, and each final one over the events received within the last 24 h
    (``events_final_since``); a district's syncs are looked at over the last 30 days."""
    now = utcnow()
    found = backlog(session)
    final_from = now - FINAL_WINDOW
    # The console's Overview shows only what is open: it skips the day's final counts.
    finals = final_since(session, final_from) if with_finals else {}
    attention = districts_needing_attention(session, since=now - SYNC_LOOKBACK)
    queues: dict[str, int] = dict.fromkeys(QUEUES, 0)
    unacked = housekeeping = 0
    broker = "unchecked"
    if with_broker:
        try:
            client = broker_client()
            queues, unacked = queue_depths(client, QUEUES)
            # The periodic purge and poll never end for good: they are not work in flight, or
            # ``pending`` would flicker above 0 at each of their runs on an idle pipeline.
            housekeeping = queues[Queue.MAINTENANCE] + (
                unacked_in(client, Queue.MAINTENANCE) if unacked else 0
            )
            # Nor is the heartbeat, which goes through the events queue; while no worker takes
            # it, one a HEARTBEAT_INTERVAL piles up there (``count_task`` reads a short queue).
            if queues[Queue.EVENTS] or unacked:
                housekeeping += count_task(
                    client, Queue.EVENTS, TaskName.HEARTBEAT, unacked=bool(unacked)
                )
            broker = "ok"
        except redis.RedisError as exc:
            broker = f"unavailable: {type(exc).__name__}"
    tasks = sum(queues.values()) + unacked - housekeeping
    return {
        "pending": found.events_in_flight + found.units_pending + found.exits_finishing + tasks,
        # Every open dead letter (SPEC §5.6): events, exit units and any other task.
        "dead": found.dead_letters_open,
        "events_dead": found.events.get(EventStatus.DEAD, 0),
        "exit_units_dead": found.units_dead,
        "held": found.events.get(EventStatus.HELD, 0),
        # Waiting for a roster pause to end: not in ``pending`` (SPEC §5.6).
        "deferred": found.events.get(EventStatus.DEFERRED, 0),
        "queues": queues,
        "unacked": unacked,
        "events": {status: n for status, n in sorted({**finals, **found.events}.items())},
        "events_final_since": final_from.isoformat(),
        "exit_units_pending": found.units_pending,
        "exits_running": found.exits_running,
        "dead_letters_open": found.dead_letters_open,
        "broker": broker,
        # Districts an operator should look at (SPEC §5.3, §5.8).
        "districts": attention,
    }
