"""Prometheus metrics, read from the database and the broker at scrape time.

The state lives in SQL and Redis, not in any one process, so a scrape of any receiver sees the
whole pipeline however many workers run, and nothing is lost when a process restarts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from models import (
    DeadLetter,
    EventStatus,
    JournalEntry,
    JournalKind,
    PollCursor,
    PollStatus,
    RosterEvent,
    RosterSync,
    SyncStatus,
    utcnow,
)
from tasks.conversion.rules import rule_outcome
from tasks.status import backlog
from tasks.sync import CHANGE_KINDS
from worker.broker import broker_client, queue_depths
from worker.celery_app import QUEUES
from worker.db import session_scope


class PipelineCollector(Collector):
    def describe(self) -> Iterator[Any]:
        # Without this a registry scrapes once at registration: importing the receiver would
        # query the database and the broker (and fail where there is none yet).
        return iter(())

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily(
            "grassroots_up", "Whether a dependency answered the scrape", labels=["dependency"]
        )
        try:
            yield from self._database()
            up.add_metric(["database"], 1)
        except SQLAlchemyError:
            up.add_metric(["database"], 0)
        try:
            depths, unacked = queue_depths(broker_client(), QUEUES)
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
            up.add_metric(["broker"], 1)
        except redis.RedisError:
            up.add_metric(["broker"], 0)
        yield up

    def _database(self) -> Iterator[Any]:
        with session_scope() as session:
            found = backlog(session)
            families = [
                _events(session),
                _conversions(session),
                _poll_districts(session),
                *_dead_letters(session),
                *_syncs(session),
            ]
            retries = session.scalar(
                select(func.coalesce(func.sum(RosterEvent.attempts - 1), 0)).where(
                    RosterEvent.attempts > 1
                )
            )
        yield from families
        yield CounterMetricFamily(
            "grassroots_task_retries", "Event task attempts beyond the first", value=retries or 0
        )
        yield GaugeMetricFamily(
            "grassroots_held_removals",
            "Removals held by the brake",
            value=found.events.get(EventStatus.HELD, 0),
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


def _events(session: Session) -> GaugeMetricFamily:
    # A gauge: an event moves from one status to the next, so a status's count goes down.
    events = GaugeMetricFamily(
        "grassroots_events",
        "Roster events in the inbox, by type and current status",
        labels=["type", "status"],
    )
    for type_, status, n in session.execute(
        select(RosterEvent.type, RosterEvent.status, func.count()).group_by(
            RosterEvent.type, RosterEvent.status
        )
    ):
        events.add_metric([type_, status], n)
    return events


def _conversions(session: Session) -> CounterMetricFamily:
    conversions = CounterMetricFamily(
        "grassroots_conversions",
        "Accounts converted, by role and outcome",
        labels=["role", "outcome"],
    )
    totals: dict[tuple[str, str], int] = {}
    for rule, n in session.execute(
        select(JournalEntry.rule, func.count())
        .where(JournalEntry.kind == JournalKind.ACCOUNT)
        .group_by(JournalEntry.rule)
    ):
        key = rule_outcome(rule)
        totals[key] = totals.get(key, 0) + n
    for (role, outcome), n in sorted(totals.items()):
        conversions.add_metric([role, outcome], n)
    return conversions


def _poll_districts(session: Session) -> GaugeMetricFamily:
    polled = GaugeMetricFamily(
        "grassroots_poll_districts",
        "Districts read from the Clever Events API, by poller status",
        labels=["status"],
    )
    by_status = dict(
        session.execute(select(PollCursor.status, func.count()).group_by(PollCursor.status))
        .tuples()
        .all()
    )
    for status in PollStatus:
        polled.add_metric([status], by_status.get(status, 0))
    return polled


def _syncs(session: Session) -> list[GaugeMetricFamily | CounterMetricFamily]:
    """Per district, seconds since its last successful sync; and what syncs changed, by kind."""
    since = GaugeMetricFamily(
        "grassroots_sync_last_success_age_seconds",
        "Seconds since the district's last successful roster sync",
        labels=["district"],
    )
    now = utcnow()
    for district_id, finished in session.execute(
        select(RosterSync.district_id, func.max(RosterSync.finished_at))
        .where(RosterSync.status == SyncStatus.DONE, RosterSync.dry_run.is_(False))
        .group_by(RosterSync.district_id)
    ):
        since.add_metric([district_id], (now - finished).total_seconds())
    changes = CounterMetricFamily(
        "grassroots_sync_changes", "Changes roster syncs found, by kind", labels=["kind"]
    )
    totals = dict.fromkeys(CHANGE_KINDS, 0)
    for (found,) in session.execute(
        select(RosterSync.changes).where(
            RosterSync.status == SyncStatus.DONE, RosterSync.dry_run.is_(False)
        )
    ):
        for kind in CHANGE_KINDS:
            totals[kind] += int(found.get(kind, 0))
    for kind, n in totals.items():
        changes.add_metric([kind], n)
    return [since, changes]


def _dead_letters(session: Session) -> list[GaugeMetricFamily]:
    dead, oldest = session.execute(
        select(func.count(), func.min(DeadLetter.first_failed_at)).where(
            DeadLetter.resolved_at.is_(None)
        )
    ).one()
    age = (utcnow() - oldest).total_seconds() if oldest is not None else 0
    return [
        GaugeMetricFamily("grassroots_dead_letters", "Open dead letters", value=dead or 0),
        GaugeMetricFamily(
            "grassroots_dead_letter_oldest_age_seconds",
            "Age of the oldest open dead letter",
            value=age,
        ),
    ]
