"""The database's figures behind ``/metrics`` (``worker.metrics`` makes them Prometheus
families). Each query is bounded by an index, to a window (received_at, the journal's
created_at, a sync's started_at) or to what is still open, so a scrape costs the same however
large the inbox and the journal grow. The backlog is ``tasks.status.backlog``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from models import (
    JournalEntry,
    JournalKind,
    PollCursor,
    RosterEvent,
    RosterSync,
    SyncStatus,
)
from tasks.conversion.rules import rule_outcome
from tasks.roster_syncs import CHANGE_KINDS


@dataclass(frozen=True)
class Received:
    by_type_and_status: dict[tuple[str, str], int]
    retries: int  # attempts beyond the first


def received(session: Session, since: datetime) -> Received:
    """The events received since ``since``, by type and current status, and their attempts
    beyond the first."""
    counts: dict[tuple[str, str], int] = {}
    retries = 0
    for type_, status, n, retried in session.execute(
        select(
            RosterEvent.type,
            RosterEvent.status,
            func.count(),
            func.sum(case((RosterEvent.attempts > 1, RosterEvent.attempts - 1), else_=0)),
        )
        .where(RosterEvent.received_at >= since)
        .group_by(RosterEvent.type, RosterEvent.status)
    ):
        counts[(type_, status)] = n
        retries += int(retried or 0)
    return Received(counts, retries)


def conversions(session: Session, since: datetime) -> dict[tuple[str, str], int]:
    """Accounts converted since ``since``, by (role, outcome)."""
    totals: dict[tuple[str, str], int] = {}
    for rule, n in session.execute(
        select(JournalEntry.rule, func.count())
        .where(JournalEntry.kind == JournalKind.ACCOUNT, JournalEntry.created_at >= since)
        .group_by(JournalEntry.rule)
    ):
        key = rule_outcome(rule)
        totals[key] = totals.get(key, 0) + n
    return totals


def poll_districts(session: Session) -> dict[str, int]:
    """Districts the poller reads, by their cursor's status."""
    return dict(
        session.execute(select(PollCursor.status, func.count()).group_by(PollCursor.status))
        .tuples()
        .all()
    )


_SYNCED = (RosterSync.status == SyncStatus.DONE, RosterSync.dry_run.is_(False))


def last_synced(session: Session, since: datetime) -> dict[str, datetime | None]:
    """Per district, when its last successful sync started since ``since`` finished."""
    return dict(
        session.execute(
            select(RosterSync.district_id, func.max(RosterSync.finished_at))
            .where(*_SYNCED, RosterSync.started_at >= since)
            .group_by(RosterSync.district_id)
        )
        .tuples()
        .all()
    )


def sync_changes(session: Session, since: datetime) -> dict[str, int]:
    """What the successful syncs started since ``since`` changed, by kind."""
    totals = dict.fromkeys(CHANGE_KINDS, 0)
    for (found,) in session.execute(
        select(RosterSync.changes).where(*_SYNCED, RosterSync.started_at >= since)
    ):
        for kind in CHANGE_KINDS:
            totals[kind] += int(found.get(kind, 0))
    return totals
