"""Sending work to the workers, by task name: the receiver, the CLI, the ops API, the relay and
the tasks themselves send through here, after the rows the work names are committed.

A broker outage while sending is logged, not raised, where the database already says what is
unfinished: the relay sends it once the broker is back.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

from kombu.exceptions import BatchPublishError  # type: ignore[attr-defined]  # kombu 5.7; stubs lag
from kombu.exceptions import OperationalError as BrokerError
from kombu.utils.uuid import uuid
from redis.exceptions import ConnectionError as RedisConnectionError

from models import RequestKind, UnitKind
from tasks.exits import ExitPlan, dispatch_pending
from tasks.operator_requests import Asked
from tasks.sql import chunks
from worker.celery_app import app
from worker.db import session_scope
from worker.names import Queue, TaskName

log = logging.getLogger("grassroots.dispatch")

# What a failed send raises: the broker is unreachable, or part of a pipeline failed.
SEND_ERRORS = (BrokerError, BatchPublishError, RedisConnectionError, OSError)


def send_one_of_many(producer: Any, name: str, args: tuple[Any, ...], queue: str | None) -> None:
    """One of many messages sent together on ``producer`` (in its pipelined batch), to ``queue``
    or where the task is routed: Celery's own message, built and published by its ``amqp``
    helpers without ``send_task``'s per-call work, half of a send's time (bench/README.md). The
    route is looked up once per task name; no queue is declared (the default exchange routes by
    queue name, and the workers declare theirs); the arguments are a few ids, whose repr is
    short. A message sent from a task names it as its parent, as ``send_task`` would."""
    amqp = app.amqp
    message = amqp.create_task_message(
        uuid(),
        name,
        args,
        {},
        argsrepr=repr(args),
        kwargsrepr="{}",
        ignore_result=True,
        **_lineage(),
    )
    # No publish retry: in a batch the publish only buffers; the batch's write raises instead.
    amqp.send_task_message(
        producer, name, message, queue=queue or _queue_of(name), declare=[], retry=False
    )


@functools.cache
def _queue_of(name: str) -> str:
    """Where Celery routes task ``name`` (``task_routes``, else the default queue)."""
    routed = app.amqp.router.route({}, name)
    return str(routed["queue"].name)


def _lineage() -> dict[str, str | None]:
    """The running task as a message's parent, and its root as the message's root."""
    parent = app.current_worker_task
    if parent is None:
        return {}
    return {"parent_id": parent.request.id, "root_id": parent.request.root_id or parent.request.id}


def enqueue_events(event_ids: Iterable[str]) -> int:
    """Send events to the workers, after their inbox rows are committed. Returns how many were
    sent; a broker outage is logged, not raised: the relay sends them once it is back.

    All of them go over one connection in pipelined round trips (kombu's ``Producer.batch``:
    Celery still builds and routes each message; only the final Redis writes are buffered).
    A pipeline that fails may have delivered part of its messages; they count as unsent, and a
    second copy sent by the relay is harmless (the event task re-reads its row).
    """
    ids = list(event_ids)
    if not ids:
        return 0
    try:
        with app.producer_or_acquire() as producer, producer.batch():
            for event_id in ids:
                send_one_of_many(producer, TaskName.PROCESS_EVENT, (event_id,), None)
    except SEND_ERRORS as exc:
        log.warning(
            "broker unavailable, %d event(s) left for the relay: %s", len(ids), type(exc).__name__
        )
        return 0
    return len(ids)


# The task each kind of request is sent as. Its message carries the district and the request's
# id; the task reads what it asks for from the row (``tasks.operator_requests.RequestLedger``).
REQUEST_TASKS = {RequestKind.EXIT: TaskName.DISTRICT_EXIT, RequestKind.SYNC: TaskName.SYNC}


def send_request(asked: Asked) -> None:
    """Send a request whose row is committed, under its task id. Raises what the broker raises:
    the caller says whether the request stands (the relay sends it) or is withdrawn."""
    app.send_task(REQUEST_TASKS[asked.kind], (asked.district_id, asked.id), task_id=asked.task_id)


def finish_exit(exit_id: int) -> None:
    app.send_task(TaskName.FINISH_EXIT, (exit_id,))


# Units sent per pipelined batch: the first units start while the rest are being sent.
DISPATCH_CHUNK = 250


def dispatch_exit(exit_id: int, planned: list[tuple[str, str]] | None = None) -> None:
    """Send the exit's pending units of its current phase (teachers, then account batches): all
    of them the first time, what is missing after a crash, the finish once none is left. Units
    are idempotent, so sending one twice does no harm.

    ``planned``: the units of an exit just planned, committed with their ``dispatched_at``
    (``dispatch_started``), sent without reading them again."""
    if planned is None:
        with session_scope() as session:
            pending = dispatch_pending(session, exit_id)
    else:
        pending = planned
    if not pending:
        finish_exit(exit_id)
        return
    with app.producer_or_acquire() as producer:
        for chunk in chunks(pending, DISPATCH_CHUNK):
            with producer.batch():
                for key, kind in chunk:
                    queue = Queue.FANOUT if kind == UnitKind.TEACHER else Queue.CONVERSIONS
                    send_one_of_many(producer, TaskName.EXIT_UNIT, (exit_id, key), queue)


def dispatch_started(plan: ExitPlan) -> None:
    """Send the units of an exit whose start has committed (an operator's request, or a
    ``districts.deleted``): as planned if this start planned them, else those still pending (a
    start delivered again finds its exit planned already)."""
    dispatch_exit(plan.exit_id, plan.pending if plan.created else None)
