"""Requests that start work no row describes yet: a district exit's start and a roster sync
(SPEC §6). Each is a row of ``operator_requests``, committed before its message is sent; the
task that gets the message acts only on what such a row asks for, and the relay sends again a
request no worker has taken. A message no row asks for (put on the broker by hand) is refused.

The other requests that start work are rows already, on the tables they act on, committed
before anything is sent: a replay or a release puts its events back to ``accepted``
(``tasks.deadletters.mark_replay``, ``tasks.brake.release_held``), a resume puts its units back
to ``pending`` (``tasks.exits.resume``); the relay sends those the broker did not take
(``tasks.inbox.unsent_events``, ``tasks.exits.stalled_exits``).
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from models import OperatorRequest, RequestKind, RequestStatus, utcnow

log = logging.getLogger("grassroots.requests")


def new_id() -> str:
    return uuid.uuid4().hex


# What a request id looks like (``new_id``): only such a value is ever logged from a message.
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Asked:
    """A request as its message is sent: the task id it goes under, what it asks for."""

    id: str
    kind: RequestKind
    district_id: str
    by: str
    dry_run: bool
    task_id: str


def _asked(row: OperatorRequest) -> Asked:
    return Asked(row.id, RequestKind(row.kind), row.district_id, row.by, row.dry_run, row.task_id)


def ask(
    session: Session,
    kind: RequestKind,
    district_id: str,
    *,
    by: str,
    dry_run: bool = False,
    request_id: str | None = None,
) -> Asked:
    """Record a request; send it once the caller's transaction has committed."""
    row = OperatorRequest(
        id=request_id or new_id(),
        kind=kind,
        district_id=district_id,
        by=by,
        dry_run=dry_run,
        status=RequestStatus.ASKED,
        task_id=new_id(),
        attempts=0,
    )
    session.add(row)
    session.flush()
    return _asked(row)


def withdraw(session: Session, request_id: str) -> bool:
    """The broker could not take the request's message, and the operator is told it did not
    start: it is never sent. False if a worker took it all the same (a send that failed after
    Redis had stored it): then it runs."""
    withdrawn = session.execute(
        update(OperatorRequest)
        .where(OperatorRequest.id == request_id, OperatorRequest.status == RequestStatus.ASKED)
        .values(status=RequestStatus.WITHDRAWN, finished_at=utcnow())
        .returning(OperatorRequest.id)
    ).first()
    return withdrawn is not None


def found(session: Session, request_id: str) -> Asked:
    """The request a task was sent for (its ledger has found it open)."""
    row = session.get(OperatorRequest, request_id)
    if row is None:
        raise LookupError(f"no request {request_id}")
    return _asked(row)


def finish(session: Session, request_id: str) -> None:
    """The request's work is done (in the work's transaction): a late copy has nothing to do."""
    session.execute(
        update(OperatorRequest)
        .where(OperatorRequest.id == request_id, OperatorRequest.status.in_(RequestStatus.open()))
        .values(status=RequestStatus.DONE, finished_at=utcnow())
    )


def status_of(session: Session, request_id: str) -> str | None:
    return session.scalar(select(OperatorRequest.status).where(OperatorRequest.id == request_id))


def unsent(
    session: Session,
    *,
    kinds: Collection[RequestKind],
    sent_before: datetime,
    taken_before: datetime,
    held: Collection[str] = (),
    limit: int = 500,
) -> list[Asked]:
    """Requests (of ``kinds``) the broker no longer holds: asked and last sent before
    ``sent_before`` (never taken: lost before a worker got it), or taken by a worker and not
    tried since ``taken_before`` (lost with the worker, or with a broker that lost its data),
    whose message no worker holds (``held``: taken from the queue, running, or waiting out a
    retry). Each is given a new task id and stamped now: send them once this commits."""
    if not kinds:
        return []
    rows = session.scalars(
        select(OperatorRequest)
        .where(
            OperatorRequest.kind.in_(kinds),
            (
                (OperatorRequest.status == RequestStatus.ASKED)
                & (OperatorRequest.sent_at < sent_before)
            )
            | (
                (OperatorRequest.status == RequestStatus.TAKEN)
                & (OperatorRequest.taken_at < taken_before)
            ),
        )
        .order_by(OperatorRequest.sent_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    now = utcnow()
    again = []
    for row in rows:
        if row.task_id in held:
            continue
        row.task_id, row.sent_at = new_id(), now
        if row.status == RequestStatus.TAKEN:
            row.taken_at = now  # left alone for as long again
        again.append(_asked(row))
    return again


def forget(session: Session, *, before: datetime) -> int:
    """The requests that finished before ``before``; an open one stays, however old."""
    result = session.execute(
        delete(OperatorRequest).where(
            OperatorRequest.status.not_in(RequestStatus.open()),
            OperatorRequest.finished_at < before,
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


class RequestLedger:
    """The task of an exit's start or a sync: its attempts are counted on its request's row, and
    it acts only while that row asks for it (this kind, this district, still open). Its message
    carries the district and the request's id; anything else is refused, and logged as such
    without repeating what the message held."""

    event_id: str | None = None

    def __init__(self, kind: RequestKind, *args: Any, **kwargs: Any) -> None:
        self.kind = kind
        district = kwargs.get("district_id", args[0] if args else None)
        request_id = kwargs.get("request_id", args[1] if len(args) > 1 else None)
        valid = (
            isinstance(district, str)
            and isinstance(request_id, str)
            and _REQUEST_ID.fullmatch(request_id) is not None
        )
        self.district_id: str | None = district if valid else None
        self.request_id: str | None = request_id if valid else None

    @classmethod
    def of(cls, kind: RequestKind) -> Callable[..., RequestLedger]:
        """The ledger a task of this kind declares (``GrassrootsTask.ledger``): built from the
        task's arguments. A partial, not a function: a function would bind as a method."""
        return functools.partial(cls, kind)

    def subject(self) -> str:
        return f"request:{self.request_id}"

    def log_ids(self) -> dict[str, Any]:
        return {"request_id": self.request_id}

    def bump(self, conn: Connection, task_id: str | None) -> int | None:
        attempts: int | None = None
        if self.request_id is not None:
            attempts = conn.scalar(
                update(OperatorRequest)
                .where(*self._asks_for(), OperatorRequest.status.in_(RequestStatus.open()))
                .values(
                    attempts=OperatorRequest.attempts + 1,
                    status=RequestStatus.TAKEN,
                    taken_at=utcnow(),
                )
                .returning(OperatorRequest.attempts)
            )
        if attempts is None and not self._on_record(conn):
            log.warning("refused a message that no %s request asks for; nothing done", self.kind)
        return attempts

    def _asks_for(self) -> tuple[Any, ...]:
        return (
            OperatorRequest.id == self.request_id,
            OperatorRequest.kind == self.kind,
            OperatorRequest.district_id == self.district_id,
        )

    def _on_record(self, conn: Connection) -> bool:
        """A request of this kind for this district (finished already: a late copy)."""
        if self.request_id is None:
            return False
        return conn.scalar(select(OperatorRequest.id).where(*self._asks_for())) is not None

    def mark_dead(self, session: Session, error: str) -> bool:
        marked = session.execute(
            update(OperatorRequest)
            .where(
                OperatorRequest.id == self.request_id,
                OperatorRequest.status.in_(RequestStatus.open()),
            )
            .values(status=RequestStatus.DEAD, finished_at=utcnow())
            .returning(OperatorRequest.id)
        ).first()
        return marked is not None

    def reject(self, session: Session, reason: str) -> bool:
        return False
