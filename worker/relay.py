"""The relay: what the database says is unfinished but the broker no longer holds, sent again.

A pass every ``RELAY_INTERVAL`` seconds, in a thread of the ``grassroots beat`` process (started
from Celery's ``beat_init`` signal: ``worker.celery_app``). A deployment runs exactly one beat, so
exactly one relay. It is not a Celery task: a task every 5 s cost three INFO lines a pass (beat's
"Sending due task", the worker's "received" and "succeeded") and crowded the real work out of
Flower's task list. The loop logs only a pass that found something to do, and a failing streak
once at its start and once at its end.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from models import utcnow
from tasks import operator_requests
from tasks.exits import stalled_exits
from tasks.inbox import unsent_events
from tasks.operator_requests import Asked
from worker.broker import broker_client, held_task_ids, queue_depths, restore_orphans
from worker.celery_app import QUEUES, app
from worker.db import session_scope
from worker.dispatch import REQUEST_TASKS, dispatch_exit, enqueue_events, send_request
from worker.names import ROUTES, Queue
from worker.settings import get_settings

log = logging.getLogger("grassroots.relay")


def relay_pass() -> dict[str, int]:
    """Put back the messages of killed workers (``worker.broker.restore_orphans``), then send
    again what the database says is unfinished but the broker no longer holds: events accepted
    while the broker was down or stuck in processing past the retry window with no worker
    holding their task, the units of exits that stopped progressing, and the requests (an
    exit's start, a sync) whose message never reached a worker or was lost with one. Only when
    their queues are drained, so work merely waiting its turn is not sent twice (a second copy
    would be harmless, only wasteful).
    Returns how many of each it sent or put back."""
    settings = get_settings()
    orphans = restore_orphans(app, older_than=settings.relay_after_seconds)
    client = broker_client()
    depths, _ = queue_depths(client, QUEUES)
    now = utcnow()
    quiet = now - timedelta(seconds=settings.relay_after_seconds)
    # A task waiting out a retry countdown stays "processing"; leave it alone for that long.
    stuck = now - timedelta(seconds=settings.retry_backoff_max + settings.relay_after_seconds)
    waiting: list[str] = []
    exit_ids: list[int] = []
    asked: list[Asked] = []
    held = functools.cache(lambda: held_task_ids(client))
    drained = [kind for kind, task in REQUEST_TASKS.items() if depths[ROUTES[task]["queue"]] == 0]
    with session_scope() as session:
        if depths[Queue.EVENTS] == 0:
            waiting = unsent_events(
                session, accepted_before=quiet, processing_before=stuck, held=held()
            )
        if depths[Queue.FANOUT] == 0 and depths[Queue.CONVERSIONS] == 0:
            exit_ids = stalled_exits(session, since=quiet)
        if drained:
            asked = operator_requests.unsent(
                session, kinds=drained, sent_before=quiet, taken_before=stuck, held=held()
            )
    sent = enqueue_events(waiting)
    for exit_id in exit_ids:
        dispatch_exit(exit_id)
    for request in asked:
        send_request(request)
    return {
        "events": sent,
        "exits": len(exit_ids),
        "requests": len(asked),
        "restored": len(orphans),
    }


@dataclass
class RelayLoop:
    """Runs ``run_pass`` (``relay_pass``) every ``interval`` seconds until ``stop`` is set, and
    never dies of an exception. ``wait`` defaults to ``stop.wait`` (true once stopped); tests
    give it their own."""

    interval: float
    run_pass: Callable[[], dict[str, int]] = relay_pass
    stop: threading.Event = field(default_factory=threading.Event)
    wait: Callable[[float], bool] | None = None
    passes: int = 0
    failed: int = 0  # passes failed in a row

    def step(self) -> None:
        """One pass, logged only if it did something or a failing streak began or ended."""
        try:
            counts = self.run_pass()
        except Exception:
            self.failed += 1
            if self.failed == 1:
                # Once per streak: a broker outage would otherwise log this every interval.
                log.exception(
                    "relay pass failed; trying again every %gs, quietly until one succeeds",
                    self.interval,
                )
        else:
            if self.failed:
                log.warning("relay passes succeed again after %d failed in a row", self.failed)
                self.failed = 0
            done = [
                template % counts[key]
                for key, template in (
                    ("restored", "put back %d task(s) a lost worker had taken"),
                    ("events", "sent %d event(s) again"),
                    ("exits", "resumed %d stalled exit(s)"),
                    ("requests", "sent %d request(s) again"),
                )
                if counts[key]
            ]
            if done:
                log.warning("relayed: %s", ", ".join(done), extra={"relayed": counts})
        self.passes += 1
        # At DEBUG only: shows a test (or an operator) that the idle passes do run.
        log.debug("relay pass %d done", self.passes, extra={"failing": self.failed})

    def run(self) -> None:
        wait = self.wait or self.stop.wait
        while not self.stop.is_set():
            started = time.monotonic()
            self.step()
            if wait(max(0.0, self.interval - (time.monotonic() - started))):
                return


def start(interval: float) -> RelayLoop:
    """The relay in a daemon thread of this process: it ends with the process."""
    loop = RelayLoop(interval)
    threading.Thread(target=loop.run, name="grassroots-relay", daemon=True).start()
    return loop
