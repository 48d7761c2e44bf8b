"""The ordering fence (SPEC §4): events for the same object can arrive twice, late or out of
order. An event older (by Clever ``created``, then event id) than the newest one already applied
to its object is ``stale`` and changes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.orm import Session

from models import ObjectVersion, RosterEvent
from tasks.sql import dialect_insert, execute_dml

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Newest:
    """The newest event applied to an object, as its fence row holds it (locked)."""

    object_type: str
    object_id: str
    occurred_at: datetime
    event_id: str


def lock(session: Session, ev: RosterEvent) -> Newest | None:
    """Lock the fence row of the event's object (creating it first), or None if the event has
    no object. Held to the commit: events about one object are applied one at a time."""
    if ev.object_type is None or ev.object_id is None:
        return None
    # Not through the ORM: every event runs it, and the ORM's insert-returning-an-entity path
    # cost three times the statement's own time.
    occurred_at, event_id = execute_dml(
        session, _upsert(session), {"object_type": ev.object_type, "object_id": ev.object_id}
    ).one()
    return Newest(ev.object_type, ev.object_id, occurred_at, event_id)


_UPSERTS: dict[str, Any] = {}


def _upsert(session: Session) -> Any:
    """The fence's statement for the session's database, built once per dialect: every event
    runs it.

    One statement: a row already there is "updated" to itself, which locks it (waiting for
    another event of the object to commit first) and returns it as it now stands."""
    dialect = session.get_bind().dialect.name
    if dialect not in _UPSERTS:
        new = dialect_insert(session, ObjectVersion).values(
            object_type=bindparam("object_type"),
            object_id=bindparam("object_id"),
            occurred_at=EPOCH,
            event_id="",
        )
        _UPSERTS[dialect] = new.on_conflict_do_update(
            index_elements=[ObjectVersion.object_type, ObjectVersion.object_id],
            set_={"occurred_at": ObjectVersion.occurred_at},
        ).returning(ObjectVersion.occurred_at, ObjectVersion.event_id)
    return _UPSERTS[dialect]


def is_stale(newest: Newest, ev: RosterEvent) -> bool:
    assert ev.occurred_at is not None
    return (ev.occurred_at, ev.id) < (newest.occurred_at, newest.event_id)


_ADVANCE = (
    update(ObjectVersion)
    .where(
        ObjectVersion.object_type == bindparam("fence_type"),
        ObjectVersion.object_id == bindparam("fence_id"),
    )
    .values(occurred_at=bindparam("fence_at"), event_id=bindparam("fence_event"))
)


def advance(session: Session, newest: Newest, ev: RosterEvent) -> None:
    """The event was applied: it is now the newest of its object (whose row ``lock`` holds)."""
    assert ev.occurred_at is not None
    execute_dml(
        session,
        _ADVANCE,
        {
            "fence_type": newest.object_type,
            "fence_id": newest.object_id,
            "fence_at": ev.occurred_at,
            "fence_event": ev.id,
        },
    )
