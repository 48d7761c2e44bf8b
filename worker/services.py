"""The operator actions (SPEC §5.5, §5.6), once each, for the command line and the ops API alike:
the change is committed first, then what it frees is sent to the workers.

Each raises ``tasks.errors.NotFound`` (no such event or district) or another
``GrassrootsError`` (refused, with a message for the operator) and returns what it did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from models import District, RequestKind, utcnow
from tasks import brake, deadletters, exits, operator_requests, pauses
from tasks.errors import NotFound
from worker import dispatch
from worker.db import session_scope


class BrokerUnavailable(Exception):
    """The broker could not take the work: nothing was started."""


@dataclass
class Replayed:
    """What became of each event asked for (``deadletters.REPLAYED`` or why not), and how many
    of the replayed ones reached the broker (the relay sends the rest)."""

    outcomes: dict[str, str] = field(default_factory=dict)
    sent: int = 0

    @property
    def replayed(self) -> list[str]:
        return [e for e, outcome in self.outcomes.items() if outcome == deadletters.REPLAYED]


def replay(event_ids: Sequence[str], *, by: str) -> Replayed:
    """Send dead events round again by their ids."""
    with session_scope() as session:
        outcomes = {e: deadletters.mark_replay(session, e, by=by) for e in event_ids}
    result = Replayed(outcomes)
    result.sent = dispatch.enqueue_events(result.replayed)
    return result


def replay_dead(*, type_: str | None = None, district_id: str | None = None, by: str) -> Replayed:
    """Send every dead event (of one type, of one district) round again, oldest first, a page
    at a time: each page committed, then sent (what the broker does not take, the relay sends)."""
    result = Replayed()
    after: deadletters.PageKey | None = None
    while True:
        with session_scope() as session:
            ids, after = deadletters.replay_dead_page(
                session, by=by, after=after, type_=type_, district_id=district_id
            )
        result.outcomes.update(dict.fromkeys(ids, deadletters.REPLAYED))
        result.sent += dispatch.enqueue_events(ids)
        if after is None:
            return result


def replay_group(*, task: str, error: str, up_to: int, by: str) -> Replayed:
    """Replay all of a dead-letter group as its confirmation saw it: the events of its open
    dead letters with ids up to ``up_to``; a later arrival is not swept in."""
    with session_scope() as session:
        ids = deadletters.group_events(session, task=task, error=error, up_to=up_to)
    return replay(ids, by=by)


def release_held(
    *, event_id: str | None = None, district_id: str | None = None, by: str
) -> list[str]:
    """Let held removals (one, or a district's) through the brake, and send them."""
    with session_scope() as session:
        ids = brake.release_held(session, event_id=event_id, district_id=district_id, by=by)
    dispatch.enqueue_events(ids)
    return ids


def discard_held(
    *, event_id: str | None = None, district_id: str | None = None, by: str
) -> list[str]:
    """Drop held removals (one, or a district's) for good."""
    with session_scope() as session:
        return brake.discard_held(session, event_id=event_id, district_id=district_id, by=by)


def discard_event(event_id: str, *, by: str) -> str:
    """Drop a held or deferred event for good: what it would have removed stays. The status it
    had."""
    with session_scope() as session:
        return pauses.discard(session, event_id, by=by)


def add_pause(
    *,
    district_id: str | None,
    starts_at: datetime | None,
    ends_at: datetime,
    reason: str | None,
    by: str,
) -> dict[str, Any]:
    """A roster pause of one district, or every one (None), from ``starts_at`` (None: now)."""
    with session_scope() as session:
        return pauses.add(
            session,
            district_id=district_id,
            starts_at=starts_at,
            ends_at=ends_at,
            reason=reason,
            by=by,
            now=utcnow(),
        )


def list_pauses() -> list[dict[str, Any]]:
    with session_scope() as session:
        return pauses.listed(session, now=utcnow())


def remove_pause(pause_id: int, *, by: str) -> dict[str, Any]:
    """End a pause early: what it deferred is released at once and sent, in Clever order (what
    the broker cannot take now, the relay sends). The pause, with how many it released."""
    with session_scope() as session:
        now = utcnow()
        removed = pauses.remove(session, pause_id, by=by, now=now)
        released = pauses.release_due(session, now=now)
    dispatch.enqueue_events(released)
    return {**removed, "released": len(released)}


def start_exit(district_id: str, *, by: str) -> str:
    """Start a district's exit (contract end) on the workers: its request is committed, then
    sent (the relay sends it again if the broker loses it). The request's id: its row says
    whether the start was done or dead-lettered (``operator_requests.status_of``)."""
    with session_scope() as session:
        if session.get(District, district_id) is None:
            raise NotFound(f"no district {district_id}")
        asked = operator_requests.ask(session, RequestKind.EXIT, district_id, by=by)
    try:
        dispatch.send_request(asked)
    except dispatch.SEND_ERRORS as exc:
        with session_scope() as session:
            if not operator_requests.withdraw(session, asked.id):
                return asked.id  # a worker took it all the same: the exit is under way
        raise BrokerUnavailable(
            f"the broker is unreachable ({type(exc).__name__}): the exit was not started"
        ) from exc
    return asked.id


def resume_exit(district_id: str, *, by: str) -> exits.Resumed:
    """Send the dead and stalled units of a district's exit round again, by the same keys."""
    with session_scope() as session:
        resumed = exits.resume(session, district_id, by=by)
    try:
        dispatch.dispatch_exit(resumed.exit_id)
    except dispatch.SEND_ERRORS as exc:
        # Its units are pending again: the relay sends them once the broker is back.
        raise BrokerUnavailable(
            f"the broker is unreachable ({type(exc).__name__}): the units are pending again and"
            " the relay sends them once it is back"
        ) from exc
    return resumed
