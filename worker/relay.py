"""The relay: what the database says is unfinished but the broker no longer holds, sent again.

A pass every ``RELAY_INTERVAL`` seconds, in a thread of the ``grassroots beat`` process (started
from Celery's ``beat_init`` signal: ``worker.celery_app``). A deployment runs exactly one beat, so
exactly one relay. It is not a Celery task: a task every 5 s cost three INFO lines a pass (beat's
"Sending due task", the worker's "received" and "succeeded") and crowded the real work out of
Flower's task list. The loop logs only a pass that found something to do, and a failing streak
once at its start and once at its end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select, update

from models import DistrictExit, RosterEvent, utcnow
from worker.broker import restore_orphans
from worker.db import session_scope
from worker.settings import get_settings

log = logging.getLogger("grassroots.relay")


def relay_pass() -> dict[str, int]:
    """Put back the messages of killed workers (``worker.broker.restore_orphans``), then send
    again what the database says is unfinished but the broker no longer holds: events accepted
    while the broker was down or stuck in processing past the retry window, and the units of
    exits that stopped progressing. Only when the queues are drained, so work merely waiting its
    turn is not sent twice (a second copy would be harmless, only wasteful). Returns how many of
    each it sent or put back."""
    # The tasks module registers the Celery tasks this sends: imported here, not at the top, so
    # ``worker.celery_app`` can name this module without a circular import.
    from tasks.jobs import dispatch_exit, enqueue_events
    from worker.celery_app import app
    from worker.ops import queue_depths

    settings = get_settings()
    orphans = restore_orphans(app, older_than=settings.relay_after_seconds)
    depths, _ = queue_depths()
    now = utcnow()
    quiet = now - timedelta(seconds=settings.relay_after_seconds)
    # A task waiting out a retry countdown stays "processing"; leave it alone for that long.
    stuck = now - timedelta(seconds=settings.retry_backoff_max + settings.relay_after_seconds)
    waiting: list[str] = []
    exit_ids: list[int] = []
    with session_scope() as session:
        if depths["events"] == 0:
            waiting = list(
                session.scalars(
                    select(RosterEvent.id)
                    .where(
                        ((RosterEvent.status == "accepted") & (RosterEvent.updated_at < quiet))
                        | ((RosterEvent.status == "processing") & (RosterEvent.updated_at < stuck))
                    )
                    .order_by(RosterEvent.received_at)
                    .limit(5000)
                )
            )
            if waiting:
                session.execute(
                    update(RosterEvent).where(RosterEvent.id.in_(waiting)).values(updated_at=now)
                )
        if depths["fanout"] == 0 and depths["conversions"] == 0:
            exit_ids = list(
                session.scalars(
                    select(DistrictExit.id).where(
                        DistrictExit.status == "running", DistrictExit.progressed_at < quiet
                    )
                )
            )
            if exit_ids:
                session.execute(
                    update(DistrictExit)
                    .where(DistrictExit.id.in_(exit_ids))
                    .values(progressed_at=now)
                )
    sent = enqueue_events(waiting)
    for exit_id in exit_ids:
        dispatch_exit(exit_id)
    return {"events": sent, "exits": len(exit_ids), "restored": len(orphans)}


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
