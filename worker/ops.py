"""What operators look at: pipeline status, queue depths, event listings. Shared by the CLI and
the ops HTTP API so both say the same thing."""

from __future__ import annotations

import json
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import DeadLetter, DistrictExit, ExitUnit, RosterEvent
from worker.celery_app import QUEUES
from worker.settings import get_settings

MAINTENANCE = "maintenance"  # the periodic tasks' queue (worker.celery_app.ROUTES)
# kombu's Redis transport keeps each priority level of a queue in its own list.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def broker_client() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().broker_url, socket_timeout=2, socket_connect_timeout=2
    )


def queue_depths(client: redis.Redis | None = None) -> tuple[dict[str, int], int]:
    """Messages waiting per named queue, and messages delivered but not yet acknowledged
    (running, or waiting out a retry countdown)."""
    client = client or broker_client()
    pipe = client.pipeline()
    for name in QUEUES:
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(name + suffix)
    pipe.hlen("unacked")
    counts = pipe.execute()
    depths = {
        name: sum(counts[i * len(_PRIORITY_SUFFIXES) : (i + 1) * len(_PRIORITY_SUFFIXES)])
        for i, name in enumerate(QUEUES)
    }
    return depths, int(counts[-1])


def _unacked_in(client: redis.Redis, queue: str) -> int:
    """Messages taken from ``queue`` and not yet acknowledged (kombu keeps each as JSON
    ``[message, exchange, routing key]``; a routing key names its queue)."""
    return sum(1 for stored in client.hvals("unacked") if json.loads(stored)[2] == queue)


def event_row(ev: RosterEvent) -> dict[str, Any]:
    return {
        "id": ev.id,
        "type": ev.type,
        "status": ev.status,
        "attempts": ev.attempts,
        "error": ev.error,
        "received_at": ev.received_at.isoformat(),
    }


def event_detail(session: Session, ev: RosterEvent) -> dict[str, Any]:
    letters = session.scalars(
        select(DeadLetter).where(DeadLetter.event_id == ev.id).order_by(DeadLetter.id)
    ).all()
    return {
        **event_row(ev),
        "source": ev.source,
        "district": ev.district_id,
        "object": {"type": ev.object_type, "id": ev.object_id},
        "created": ev.occurred_at.isoformat() if ev.occurred_at else None,
        "updated_at": ev.updated_at.isoformat(),
        "dead_letters": [
            {
                "id": d.id,
                "task": d.task,
                "reason": d.reason,
                "error": d.error,
                "attempts": d.attempts,
                "first_failed_at": d.first_failed_at.isoformat(),
                "last_failed_at": d.last_failed_at.isoformat(),
                "resolved_at": d.resolved_at.isoformat() if d.resolved_at else None,
                "traceback": d.traceback,
            }
            for d in letters
        ],
    }


def list_events(
    session: Session, *, status: str | None = None, type_: str | None = None, limit: int = 100
) -> list[RosterEvent]:
    query = (
        select(RosterEvent).order_by(RosterEvent.received_at.desc(), RosterEvent.id).limit(limit)
    )
    if status:
        query = query.where(RosterEvent.status == status)
    if type_:
        query = query.where(RosterEvent.type == type_)
    return list(session.scalars(query))


def pipeline_status(session: Session, *, with_broker: bool = True) -> dict[str, Any]:
    """``pending`` is 0 only when nothing is in flight: no event waiting or being processed, no
    exit unit left, no task queued or running."""
    by_status = dict(
        session.execute(select(RosterEvent.status, func.count()).group_by(RosterEvent.status))
        .tuples()
        .all()
    )
    units = (
        session.scalar(
            select(func.count()).select_from(ExitUnit).where(ExitUnit.status == "pending")
        )
        or 0
    )
    exits_running = (
        session.scalar(
            select(func.count()).select_from(DistrictExit).where(DistrictExit.status == "running")
        )
        or 0
    )
    # An exit whose units are all done is still in flight until its finish step has run.
    exits_finishing = (
        session.scalar(
            select(func.count())
            .select_from(DistrictExit)
            .where(
                DistrictExit.status == "running",
                DistrictExit.units_done >= DistrictExit.units_total,
            )
        )
        or 0
    )
    dead_letters = (
        session.scalar(
            select(func.count()).select_from(DeadLetter).where(DeadLetter.resolved_at.is_(None))
        )
        or 0
    )
    queues: dict[str, int] = dict.fromkeys(QUEUES, 0)
    unacked = housekeeping = 0
    broker = "unchecked"
    if with_broker:
        try:
            client = broker_client()
            queues, unacked = queue_depths(client)
            # The periodic purge and poll never end for good: they are not work in flight, or
            # ``pending`` would flicker above 0 at each of their runs on an idle pipeline.
            housekeeping = queues[MAINTENANCE] + (
                _unacked_in(client, MAINTENANCE) if unacked else 0
            )
            broker = "ok"
        except redis.RedisError as exc:
            broker = f"unavailable: {type(exc).__name__}"
    in_flight_events = by_status.get("accepted", 0) + by_status.get("processing", 0)
    tasks = sum(queues.values()) + unacked - housekeeping
    return {
        "pending": in_flight_events + units + exits_finishing + tasks,
        "dead": by_status.get("dead", 0),
        "held": by_status.get("held", 0),
        "queues": queues,
        "unacked": unacked,
        "events": {status: by_status.get(status, 0) for status in sorted(by_status)},
        "exit_units_pending": units,
        "exits_running": exits_running,
        "dead_letters_open": dead_letters,
        "broker": broker,
    }
