"""Prometheus metrics, read from the database and the broker at scrape time.

The state lives in SQL and Redis, not in any one process, so a scrape of any receiver sees the
whole pipeline however many workers run, and nothing is lost when a process restarts.

A scrape costs the same however large the inbox and the journal grow: every query is bounded by
an index, to a window (the inbox by type and status, and conversions, over the last 24 h) or to
what is still open (the backlog's statuses, open dead letters, running exits). A scrape's result
is kept for ``SCRAPE_CACHE_SECONDS``: scrapes that come faster (several Prometheus servers, a
dashboard, a caller looping) cost the database and the broker one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from models import (
    EventStatus,
    PollStatus,
    utcnow,
)
from tasks import heartbeat, tallies
from tasks.status import (
    FINAL_WINDOW,
    OPEN,
    SYNC_LOOKBACK,
    backlog,
    districts_needing_attention,
    oldest_pending,
    open_dead_letters,
    poll_cursor_ages,
    stalled_districts,
)
from worker import connection_limits, rejections
from worker.broker import broker_client, queue_depths
from worker.celery_app import QUEUES
from worker.clever import parse_tokens
from worker.db import session_scope
from worker.settings import get_settings
from worker.throttled_counts import Tally

# The windowed metrics (``_last_24h``); a district with a token and no successful sync within
# ``SYNC_LOOKBACK`` is reported +Inf seconds ago.
WINDOW = FINAL_WINDOW
SCRAPE_CACHE_SECONDS = 5.0
# A metric by district has a series for at most this many districts (for the poll cursor's age,
# those whose cursor moved longest ago; for stalled exits and sync problems, the first by id); the
# rest are one series, ``district="other"`` (the oldest of them; how many they are). A deployment
# has a handful to hundreds of districts: the cap keeps a scrape's size, and Prometheus' series,
# bounded whatever their number grows to.
DISTRICT_SERIES = 50
OTHER_DISTRICTS = "other"
BACKLOG = OPEN


class PipelineCollector(Collector):
    def __init__(
        self,
        *,
        cache_seconds: float = SCRAPE_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        uptime: Callable[[], float] | None = None,
    ) -> None:
        self.cache_seconds = cache_seconds
        self._clock = clock
        # How long the serving process has been up: the heartbeat's age until a worker has run
        # one (as ``/readyz`` counts it).
        self._uptime = uptime
        # One scrape at a time: those that arrive meanwhile wait for it and share its result.
        self._lock = threading.Lock()
        self._scraped: list[Any] | None = None
        self._scraped_at = 0.0

    def describe(self) -> Iterator[Any]:
        # Without this a registry scrapes once at registration: importing the receiver would
        # query the database and the broker (and fail where there is none yet).
        return iter(())

    def collect(self) -> Iterator[Any]:
        with self._lock:
            if self._scraped is None or self._clock() - self._scraped_at >= self.cache_seconds:
                self._scraped = list(self._scrape())
                self._scraped_at = self._clock()
            return iter(self._scraped)

    def _scrape(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            "grassroots_up", "Whether a dependency answered the scrape", labels=["dependency"]
        )
        try:
            yield from self._database()
            up.add_metric(["database"], 1)
        except SQLAlchemyError:
            up.add_metric(["database"], 0)
        try:
            client = broker_client()
            depths, unacked = queue_depths(client, QUEUES)
            depth = GaugeMetricFamily(
                "grassroots_queue_depth_messages",
                "Messages waiting in each Celery queue",
                labels=["queue"],
            )
            for name, n in depths.items():
                depth.add_metric([name], n)
            yield depth
            yield GaugeMetricFamily(
                "grassroots_queue_unacked_messages",
                "Messages delivered to a worker and not yet acknowledged",
                value=unacked,
            )
            yield from _throttled_counts(client)
            up.add_metric(["broker"], 1)
        except redis.RedisError:
            up.add_metric(["broker"], 0)
        yield up

    def _database(self) -> Iterator[Any]:
        now = utcnow()
        with session_scope() as session:
            found = backlog(session)
            families = [
                *_events(session, now - WINDOW),
                _conversions(session, now - WINDOW),
                _poll_districts(session),
                *_dead_letters(session, now),
                *_syncs(session, now),
                *_heartbeat(session, now, self._uptime),
                *_stuck(session, now),
            ]
        yield from families
        waiting = GaugeMetricFamily(
            "grassroots_events_backlog",
            "Roster events waiting for a worker (accepted, processing), an operator (held, dead)"
            " or the end of a roster pause (deferred), however long ago received",
            labels=["status"],
        )
        for status in BACKLOG:
            waiting.add_metric([status], found.events.get(status, 0))
        yield waiting
        yield GaugeMetricFamily(
            "grassroots_held_removals",
            "Removals held by the brake",
            value=found.events.get(EventStatus.HELD, 0),
        )
        yield GaugeMetricFamily(
            "grassroots_deferred_events",
            "Destructive roster changes deferred by a roster pause, applied when it ends",
            value=found.events.get(EventStatus.DEFERRED, 0),
        )
        yield GaugeMetricFamily(
            "grassroots_district_exits_in_progress",
            "District exits still running",
            value=found.exits_running,
        )
        yield GaugeMetricFamily(
            "grassroots_exit_units_pending",
            "Fan-out units of running exits not yet done",
            value=found.units_pending,
        )
        yield GaugeMetricFamily(
            "grassroots_exit_units_dead",
            "Fan-out units dead-lettered, waiting for `district resume`",
            value=found.units_dead,
        )


def _events(session: Session, since: datetime) -> list[GaugeMetricFamily]:
    # A gauge: an event moves from one status to the next, so a status's count goes down.
    events = GaugeMetricFamily(
        "grassroots_events_last_24h",
        "Roster events received in the last 24 h, by type and current status",
        labels=["type", "status"],
    )
    found = tallies.received(session, since)
    for (type_, status), n in found.by_type_and_status.items():
        events.add_metric([type_, status], n)
    return [
        events,
        GaugeMetricFamily(
            "grassroots_event_retries_last_24h",
            "Attempts beyond the first of the roster events received in the last 24 h",
            value=found.retries,
        ),
    ]


def _conversions(session: Session, since: datetime) -> GaugeMetricFamily:
    conversions = GaugeMetricFamily(
        "grassroots_conversions_last_24h",
        "Accounts converted in the last 24 h, by role and outcome",
        labels=["role", "outcome"],
    )
    for (role, outcome), n in sorted(tallies.conversions(session, since).items()):
        conversions.add_metric([role, outcome], n)
    return conversions


def _poll_districts(session: Session) -> GaugeMetricFamily:
    polled = GaugeMetricFamily(
        "grassroots_poll_districts",
        "Districts read from the Clever Events API, by poller status",
        labels=["status"],
    )
    by_status = tallies.poll_districts(session)
    for status in PollStatus:
        polled.add_metric([status], by_status.get(status, 0))
    return polled


def _syncs(session: Session, now: datetime) -> list[GaugeMetricFamily]:
    """Per district, seconds since its last successful sync; and what the syncs of the last 24 h
    changed, by kind."""
    since = GaugeMetricFamily(
        "grassroots_sync_last_success_age_seconds",
        "Seconds since the district's last successful roster sync (+Inf: none in 30 days)",
        labels=["district"],
    )
    last = tallies.last_synced(session, now - SYNC_LOOKBACK)
    synced = {token.district_id for token in parse_tokens(get_settings().clever_district_tokens)}
    for district_id in sorted(synced | set(last)):
        finished = last.get(district_id)
        age = (now - finished).total_seconds() if finished is not None else float("inf")
        since.add_metric([district_id], age)
    changes = GaugeMetricFamily(
        "grassroots_sync_changes_last_24h",
        "Changes the roster syncs started in the last 24 h found, by kind",
        labels=["kind"],
    )
    for kind, n in tallies.sync_changes(session, now - WINDOW).items():
        changes.add_metric([kind], n)
    return [since, changes]


def _dead_letters(session: Session, now: datetime) -> list[GaugeMetricFamily]:
    groups = open_dead_letters(session)
    by_task = GaugeMetricFamily(
        "grassroots_dead_letters_by_task",
        "Open dead letters by task and reason (a group is exported while it has one)",
        labels=["task", "reason"],
    )
    for (task, reason), group in sorted(groups.items()):
        by_task.add_metric([task, reason], group.count)
    oldest = min((group.oldest for group in groups.values()), default=None)
    return [
        GaugeMetricFamily(
            "grassroots_dead_letters",
            "Open dead letters",
            value=sum(group.count for group in groups.values()),
        ),
        by_task,
        GaugeMetricFamily(
            "grassroots_dead_letter_oldest_age_seconds",
            "Age of the oldest open dead letter (0: none)",
            value=_age(now, oldest),
        ),
    ]


def _age(now: datetime, then: datetime | None) -> float:
    return max(0.0, (now - then).total_seconds()) if then is not None else 0.0


def _heartbeat(
    session: Session, now: datetime, uptime: Callable[[], float] | None
) -> list[GaugeMetricFamily]:
    """Seconds since a worker last ran the heartbeat; none ever: since this process started
    (``/readyz`` fails past HEARTBEAT_MAX_AGE of either), or nothing where that is not known."""
    age = heartbeat.age(session, now=now)
    if age is None and uptime is not None:
        age = uptime()
    families = [
        GaugeMetricFamily(
            "grassroots_heartbeat_max_age_seconds",
            "HEARTBEAT_MAX_AGE: how old the heartbeat may grow before /readyz fails (0: off)",
            value=get_settings().heartbeat_max_age,
        )
    ]
    if age is not None:
        families.append(
            GaugeMetricFamily(
                "grassroots_worker_heartbeat_age_seconds",
                "Seconds since a worker last ran the heartbeat task that beat sends through the"
                " events queue every HEARTBEAT_INTERVAL (none yet: since this receiver started)",
                value=age,
            )
        )
    return families


def _stuck(session: Session, now: datetime) -> list[GaugeMetricFamily]:
    """What waits too long: the oldest pending event, stalled exits and districts whose sync
    needs an operator (by district, for the alerts to name them), and how long ago each
    district's poll cursor moved."""
    stalled = GaugeMetricFamily(
        "grassroots_district_exits_stalled",
        "District exits stalled: running with a dead unit, waiting for `district resume`, by"
        f' district (beyond {DISTRICT_SERIES}: district="{OTHER_DISTRICTS}", how many)',
        labels=["district"],
    )
    _by_district(stalled, stalled_districts(session))
    problems = GaugeMetricFamily(
        "grassroots_district_sync_problems",
        "Districts whose last roster sync (in 30 days) failed (sync_failed), or whose poll cursor"
        f" needs a resync (resync_needed): 1 each (beyond {DISTRICT_SERIES} of a problem:"
        f' district="{OTHER_DISTRICTS}", how many)',
        labels=["district", "problem"],
    )
    attention = districts_needing_attention(session, since=now - SYNC_LOOKBACK)
    for problem in ("sync_failed", "resync_needed"):
        _by_district(problems, attention[problem], problem)
    return [
        GaugeMetricFamily(
            "grassroots_pending_event_oldest_age_seconds",
            "Age of the oldest roster event waiting for a worker or being worked on (0: none)",
            value=_age(now, oldest_pending(session)),
        ),
        stalled,
        problems,
        _poll_ages(session, now),
    ]


def _by_district(family: GaugeMetricFamily, districts: list[str], *labels: str) -> None:
    """1 for each of the first ``DISTRICT_SERIES`` districts; the others' count as one
    ``district="other"`` series."""
    for district in districts[:DISTRICT_SERIES]:
        family.add_metric([district, *labels], 1)
    if len(districts) > DISTRICT_SERIES:
        family.add_metric([OTHER_DISTRICTS, *labels], len(districts) - DISTRICT_SERIES)


def _poll_ages(session: Session, now: datetime) -> GaugeMetricFamily:
    ages = GaugeMetricFamily(
        "grassroots_poll_cursor_age_seconds",
        "Seconds since the district's poll cursor last moved (a successful pass), for the"
        f" {DISTRICT_SERIES} districts whose cursor moved longest ago; the others as"
        f' district="{OTHER_DISTRICTS}", the oldest of them',
        labels=["district"],
    )
    # One more than the cap: the first beyond it is the oldest of the others.
    found = poll_cursor_ages(session, now=now, limit=DISTRICT_SERIES + 1)
    for district, age in found[:DISTRICT_SERIES]:
        ages.add_metric([district], age)
    if len(found) > DISTRICT_SERIES:
        ages.add_metric([OTHER_DISTRICTS], found[DISTRICT_SERIES][1])
    return ages


def _tally(client: redis.Redis, tally: Tally, name: str, help_text: str) -> CounterMetricFamily:
    # This process's counts first: a scrape of the process that counted them includes them.
    tally.send(client)
    family = CounterMetricFamily(name, help_text, labels=["reason"])
    for reason, n in tally.totals(client).items():
        family.add_metric([reason], n)
    return family


def _throttled_counts(client: redis.Redis) -> list[CounterMetricFamily]:
    return [
        _tally(
            client,
            rejections.REJECTIONS,
            "grassroots_webhook_signature_rejections",
            "Webhooks refused with 401 for their signature, by reason, by every receiver",
        ),
        _tally(
            client,
            connection_limits.CUTS,
            "grassroots_http_connections_cut",
            "Connections closed before their request was answered (slow, oversized, over the"
            " connection cap, or aborted by the client), by reason, by every serving process",
        ),
    ]
