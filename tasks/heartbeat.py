"""The workers' heartbeat (SPEC §5.5 ``/readyz``): beat sends a heartbeat task through the events
queue every HEARTBEAT_INTERVAL seconds, and the worker that runs it stamps its row here. The row's
age is proof that a worker takes work from that queue, which no check of a process being alive
can give (a worker whose broker connection hangs, or whose every slot is stuck, is alive).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from models import Heartbeat, utcnow
from tasks.sql import dialect_insert

# The heartbeat that goes through the events queue: the queue whose stall matters.
EVENTS = "events"


def record(session: Session, name: str = EVENTS, *, host: str | None = None) -> None:
    """Stamp the heartbeat ``name`` now (one upsert: any number of workers may run it at once)."""
    now = utcnow()
    session.execute(
        dialect_insert(session, Heartbeat)
        .values(name=name, at=now, host=host)
        .on_conflict_do_update(index_elements=[Heartbeat.name], set_={"at": now, "host": host})
    )


def age(session: Session, name: str = EVENTS, *, now: datetime | None = None) -> float | None:
    """Seconds since the heartbeat ``name`` was last stamped; None if it never was."""
    at = session.scalar(select(Heartbeat.at).where(Heartbeat.name == name))
    if at is None:
        return None
    return max(0.0, ((now or utcnow()) - at).total_seconds())


@dataclass(frozen=True)
class Verdict:
    ready: bool
    check: str  # what ``/readyz`` says of the heartbeat


def verdict(last: float | None, *, max_age: float, uptime: float) -> Verdict:
    """Whether the heartbeat's age (``last``; None: never stamped) lets the receiver call the
    pipeline ready. With no heartbeat ever, a deployment is given ``max_age`` seconds of the
    receiver's ``uptime`` before it fails: its first worker and beat may still be starting."""
    if max_age <= 0:
        return Verdict(True, "off")
    bound = f"HEARTBEAT_MAX_AGE={max_age:g} s"
    if last is None:
        if uptime <= max_age:
            return Verdict(True, f"ok: no heartbeat yet ({uptime:.0f} s up, {bound})")
        return Verdict(
            False,
            f"stale: no worker has run the heartbeat task in the {uptime:.0f} s this receiver"
            f" has been up ({bound}): no worker takes work from the events queue",
        )
    if last > max_age:
        return Verdict(
            False,
            f"stale: the last heartbeat a worker ran was {last:.0f} s ago ({bound}): no worker"
            " takes work from the events queue",
        )
    return Verdict(True, "ok")


class HeartbeatLedger:
    """The heartbeat's attempts (``tasks.attempts.Ledger``): not counted. Its row is its record,
    a failed beat is not retried (the next one comes within HEARTBEAT_INTERVAL), and counting
    would add a write per beat to no end."""

    event_id: str | None = None

    def __init__(self, *_: Any, **__: Any) -> None:
        pass

    def subject(self) -> str:
        return "heartbeat"

    def log_ids(self) -> dict[str, Any]:
        return {}

    def bump(self, conn: Connection, task_id: str | None) -> int | None:
        return 1

    def mark_dead(self, session: Session, error: str) -> bool:
        return True
