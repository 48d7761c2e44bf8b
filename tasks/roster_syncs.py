"""A roster sync's record (``models.RosterSync``, SPEC §5.8): begun before the pull, failed or
finished with what it found (``Report``, the ``sync --json`` object), where the district's feed
stood, whether a district needing a resync is due one, and the latest as ``sync --json`` prints
it. Reconciling the pull is ``tasks.reconcile``'s; the pull itself ``worker.sync``'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import RosterSync, SyncStatus, utcnow

# What a report's "changes" counts, in SPEC §5.8's order.
CHANGE_KINDS = (
    "users_created",
    "users_updated",
    "users_deleted",
    "roles_lost",
    "sections_created",
    "sections_updated",
    "sections_deleted",
)


@dataclass
class Report:
    """What a sync found (and, unless a dry run, did): SPEC §5.8's ``--json`` object."""

    district: str
    sync_id: str
    status: str = SyncStatus.DONE
    reason: str | None = None
    pulled: dict[str, int] = field(default_factory=lambda: {"users": 0, "sections": 0})
    changes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANGE_KINDS, 0))
    held: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # The inbox events it recorded, to send to the workers once committed.
    events: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "district": self.district,
            "sync_id": self.sync_id,
            "status": self.status,
            "reason": self.reason,
            "pulled": self.pulled,
            "changes": self.changes,
            "held": self.held,
        }


def begin(
    session: Session, district_id: str, sync_id: str, *, trigger: str, dry_run: bool
) -> RosterSync:
    row = RosterSync(
        id=sync_id,
        district_id=district_id,
        status=SyncStatus.RUNNING,
        dry_run=dry_run,
        trigger=trigger,
        changes={},
    )
    session.add(row)
    session.flush()
    return row


def fail(session: Session, sync_id: str, reason: str) -> None:
    """The pull did not complete, or was refused: nothing is applied."""
    session.execute(
        update(RosterSync)
        .where(RosterSync.id == sync_id)
        .values(status=SyncStatus.FAILED, reason=reason, finished_at=utcnow())
    )


def record_position(session: Session, sync_id: str, position: str | None) -> None:
    session.execute(
        update(RosterSync).where(RosterSync.id == sync_id).values(feed_position=position)
    )


def resync_due(session: Session, district_id: str, *, now: datetime, every: timedelta) -> bool:
    """Whether a district that needs a resync should get one now: none is running (one that
    started over ``STALE`` ago was lost with its worker), and the last ended ``every`` ago."""
    row = session.scalar(
        select(RosterSync)
        .where(RosterSync.district_id == district_id, RosterSync.dry_run.is_(False))
        .order_by(RosterSync.started_at.desc())
        .limit(1)
    )
    if row is None:
        return True
    if row.status == SyncStatus.RUNNING:
        return row.started_at < now - STALE
    return row.finished_at is None or row.finished_at < now - every


# A sync running this long has been lost with its worker.
STALE = timedelta(hours=1)


def latest(session: Session, district_id: str) -> dict[str, Any] | None:
    """The district's last sync, as ``sync --json`` prints it, with when it ran."""
    row = session.scalar(
        select(RosterSync)
        .where(RosterSync.district_id == district_id)
        .order_by(RosterSync.started_at.desc(), RosterSync.id)
        .limit(1)
    )
    return None if row is None else describe(row)


def describe(row: RosterSync) -> dict[str, Any]:
    return {
        **Report(
            district=row.district_id,
            sync_id=row.id,
            status=row.status,
            reason=row.reason,
            pulled={"users": row.pulled_users, "sections": row.pulled_sections},
            changes={kind: int(row.changes.get(kind, 0)) for kind in CHANGE_KINDS},
            held=row.held,
        ).as_dict(),
        "dry_run": row.dry_run,
        "trigger": row.trigger,
        "started_at": row.started_at.isoformat(),
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }


def finish(session: Session, report: Report) -> Report:
    """The sync is over (done, or refused): its record says what it found and did."""
    report.finished_at = utcnow()
    session.execute(
        update(RosterSync)
        .where(RosterSync.id == report.sync_id)
        .values(
            status=report.status,
            reason=report.reason,
            pulled_users=report.pulled["users"],
            pulled_sections=report.pulled["sections"],
            changes=report.changes,
            held=report.held,
            finished_at=report.finished_at,
        )
    )
    return report
