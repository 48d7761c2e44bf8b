"""The roster-event inbox: every Clever event, from a webhook or the poller, stored once by id.

An event is committed here before anything else happens to it; a task only ever receives its id.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import EventStatus, RosterEvent, utcnow
from tasks.sql import dialect_insert, in_ids
from tasks.storable import unstorable

# Clever's resources (v3.0 and v3.1 events), by the prefix of their event types.
OBJECT_TYPES = {
    "users": "user",
    "sections": "section",
    "districts": "district",
    "schools": "school",
    "terms": "term",
    "courses": "course",
    "resources": "resource",
}
# The event types the rules act on (``tasks.events.HANDLERS``): only they need an object we can
# read. Every other event is stored ``ignored`` at once, whatever its object looks like (SPEC
# §4): a v3.0 ``Resource`` has no ``id`` at all, and the workers have nothing to do for it.
ACTED_ON = frozenset(
    {
        "users.created",
        "users.updated",
        "users.deleted",
        "sections.created",
        "sections.updated",
        "sections.deleted",
        "districts.deleted",
    }
)


# How far ahead of our clock an event's ``created`` may be: the clocks' skew the signatures
# tolerate too (``worker.signing.DEFAULT_TOLERANCE``). Beyond it, the event is ``rejected``.
CREATED_AHEAD = timedelta(minutes=5)


def not_acted_on(event_type: str) -> str:
    """The reason an event of a type we do not act on is ``ignored``."""
    return f"event type {event_type} does not concern conversions"


class BadEvent(ValueError):
    """Not an event at all (no id or type): refused, nothing stored."""


class NotJson(ValueError):
    """Not JSON that can be stored as JSON."""


def _no_constant(name: str) -> Any:
    raise NotJson(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotJson(f"the number {text[:40]} is too large")
    return value


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def parse_json(body: bytes | str) -> Any:
    """JSON as RFC 8259 has it, or ``NotJson``. Python's parser also takes ``NaN`` and
    ``Infinity`` (and reads 1e999 as infinity), which no JSON column can hold, and gives up on
    deep nesting with a ``RecursionError``: each of those would otherwise fail only when the
    event is stored."""
    try:
        text = body.decode(json.detect_encoding(body)) if isinstance(body, bytes) else body
        return _DECODER.decode(text)
    except NotJson:
        raise
    except RecursionError as exc:
        raise NotJson("the JSON is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes
        raise NotJson(f"not JSON: {exc}") from exc


@dataclass(frozen=True)
class Ingested:
    event_id: str
    new: bool
    # The stored status: "accepted"; "ignored" for a type we do not act on; "rejected" for an
    # event we act on but cannot interpret. Only "accepted" goes to the workers.
    status: str


def envelope(raw: Any) -> tuple[str, str]:
    """The event's id and type, or ``BadEvent``."""
    if not isinstance(raw, dict):
        raise BadEvent("an event is a JSON object")
    event_id, event_type = raw.get("id"), raw.get("type")
    if not _usable(event_id, 200):
        raise BadEvent("the event has no usable 'id'")
    if not _usable(event_type, 100):
        raise BadEvent("the event has no usable 'type'")
    return event_id, event_type


def _usable(value: Any, limit: int) -> TypeGuard[str]:
    """Text we can store and index: not blank, not too long, no NUL (Postgres text cannot
    hold one), no lone surrogate (a ``\\ud800`` escape, which UTF-8 cannot encode)."""
    return (
        isinstance(value, str)
        and bool(value.strip())
        and len(value) <= limit
        and "\x00" not in value
        and not any("\ud800" <= c <= "\udfff" for c in value)
    )


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def event_object(raw: dict[str, Any]) -> dict[str, Any] | None:
    data = raw.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else None


def previous_attributes(raw: dict[str, Any]) -> dict[str, Any]:
    """``previous_attributes`` may sit inside ``data`` (Clever) or beside it."""
    data = raw.get("data")
    for holder in (data if isinstance(data, dict) else {}, raw):
        prev = holder.get("previous_attributes")
        if isinstance(prev, dict):
            return prev
    return {}


def interpret(
    raw: dict[str, Any], event_type: str, now: datetime
) -> tuple[dict[str, Any], str | None]:
    """The indexed columns of an event, and why it cannot be interpreted (None if it can). Only
    an event we act on (``ACTED_ON``) can fail to be: the others are kept whatever they hold."""
    prefix = event_type.split(".", 1)[0]
    obj = event_object(raw)
    created = parse_time(raw.get("created"))
    columns: dict[str, Any] = {"object_type": OBJECT_TYPES.get(prefix), "occurred_at": created}
    object_id = obj.get("id") if obj is not None else None
    if _usable(object_id, 64):
        columns["object_id"] = object_id
    district = object_id if prefix == "districts" else (obj or {}).get("district")
    columns["district_id"] = district if _usable(district, 64) else None
    if event_type not in ACTED_ON:
        return columns, None
    if obj is None:
        return columns, "the event has no data.object"
    if "object_id" not in columns:
        return columns, "the event's object has no usable id"
    problem = _created_problem(raw.get("created"), created, now)
    if problem:
        return columns, problem
    # Checked here, once, before any rule sends a value of it to the database.
    return columns, unstorable(raw)


def _created_problem(given: Any, created: datetime | None, now: datetime) -> str | None:
    """Why an event's ``created`` cannot place it in Clever's order (None if it can). The
    ordering fence compares it: a time far ahead (a signed ``users.created`` dated 9999) would
    make every later event about its object ``stale``, and a missing one read as the receive time
    would put the event after changes Clever made later."""
    if given is None:
        return "the event has no 'created' time"
    if created is None:
        return "the event's 'created' is not an ISO 8601 time"
    if created > now + CREATED_AHEAD:
        return (
            f"the event's 'created' ({created.isoformat()}) is more than"
            f" {CREATED_AHEAD.seconds // 60} minutes ahead of the time it was received"
        )
    return None


def _status(event_type: str, problem: str | None) -> tuple[EventStatus, str | None]:
    """The status an event is stored with, and its reason."""
    if problem:
        return EventStatus.REJECTED, problem
    if event_type not in ACTED_ON:
        return EventStatus.IGNORED, not_acted_on(event_type)
    return EventStatus.ACCEPTED, None


def inbox_row(raw: Any, *, source: str, now: datetime | None = None) -> dict[str, Any]:
    """The inbox row of an event, ready to insert. ``BadEvent`` if it has no id or type.

    A signed event we cannot interpret becomes a ``rejected`` row, so nothing sent is lost; one
    of a type we do not act on an ``ignored`` row, with the reason.
    """
    event_id, event_type = envelope(raw)
    now = now or utcnow()
    columns, problem = interpret(raw, event_type, now)
    status, reason = _status(event_type, problem)
    return {
        "id": event_id,
        "type": event_type,
        "source": source,
        "payload": raw,
        "status": status,
        "error": reason,
        "attempts": 0,
        "brake_released": False,
        "received_at": now,
        "updated_at": now,
        # Every row of one multi-row INSERT has the same keys, also when interpret() stopped early.
        "object_id": None,
        "district_id": None,
        **columns,
        "occurred_at": columns["occurred_at"] or now,
    }


def store(session: Session, rows: Sequence[dict[str, Any]]) -> list[Ingested]:
    """Store rows of :func:`inbox_row` exactly once by id, in one INSERT, and say what became of
    each, in order. A repeated id is a duplicate just as if the rows had come one after another:
    the first occurrence is new unless the inbox already held it, the later ones are not."""
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        first.setdefault(row["id"], row)
    stmt = (
        dialect_insert(session, RosterEvent)
        .on_conflict_do_nothing(index_elements=[RosterEvent.id])
        .returning(RosterEvent.id)
    )
    # RETURNING, not rowcount: drivers report -1 for an INSERT that hit ON CONFLICT DO NOTHING.
    # Core executemany: SQLAlchemy sends it as one multi-row INSERT ("insertmanyvalues").
    new = set(session.connection().execute(stmt, list(first.values())).scalars())
    existing = [event_id for event_id in first if event_id not in new]
    stored: dict[str, str] = {}
    if existing:
        stored = {
            event_id: status
            for event_id, status in session.execute(
                select(RosterEvent.id, RosterEvent.status).where(in_ids(RosterEvent.id, existing))
            ).tuples()
        }
    outcomes: list[Ingested] = []
    seen: set[str] = set()
    for row in rows:
        event_id = row["id"]
        is_new = event_id in new and event_id not in seen
        seen.add(event_id)
        status = first[event_id]["status"] if event_id in new else stored.get(event_id)
        outcomes.append(Ingested(event_id, is_new, status or row["status"]))
    return outcomes


def unsent_events(
    session: Session,
    *,
    accepted_before: datetime,
    processing_before: datetime,
    held: Collection[str] = (),
    limit: int = 5000,
) -> list[str]:
    """Events the broker may never have received: accepted and left alone since
    ``accepted_before``, or processing since ``processing_before`` (a worker lost with them)
    by a task that is not among ``held`` (the task ids the broker still holds for a worker: a
    long task that is still running, or a killed worker's, which the relay's restore puts back).
    Sending those again would only add attempts to an event that has its own copy. The ones
    returned are stamped now, so the next pass leaves them alone for as long again."""
    rows = session.execute(
        select(RosterEvent.id, RosterEvent.task_id)
        .where(
            (
                (RosterEvent.status == EventStatus.ACCEPTED)
                & (RosterEvent.updated_at < accepted_before)
            )
            | (
                (RosterEvent.status == EventStatus.PROCESSING)
                & (RosterEvent.updated_at < processing_before)
            )
        )
        .order_by(RosterEvent.received_at)
        .limit(limit)
    )
    ids = [event_id for event_id, task_id in rows if task_id is None or task_id not in held]
    if ids:
        session.execute(
            update(RosterEvent).where(in_ids(RosterEvent.id, ids)).values(updated_at=utcnow())
        )
    return ids


def ingest(session: Session, raw: Any, *, source: str) -> Ingested:
    """Store one event exactly once. ``BadEvent`` if it has no id or type."""
    return store(session, [inbox_row(raw, source=source)])[0]
