"""Bad input is rejected, never dead-lettered (SPEC §5.2): generated requests, signed and not,
thrown at a real receiver and worker over a seeded district. Whatever they hold, the receiver
answers without a 5xx, nothing is dead-lettered, and every event it accepted ends final.

The payloads are Clever's own events with their objects mutated (real users and sections of
the district, any field replaced by any JSON value, NUL characters and lone surrogates
included), junk JSON, raw bytes, and broken signature headers."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import EventStatus
from tasks.inbox import ACTED_ON
from tests.support.databases import PgDatabases
from tests.support.scenario import example
from tests.support.stack import SECRET, Stack, clever_event, running_stack, wait_until
from worker.signing import signed_headers

pytestmark = pytest.mark.slow

ROSTER = example()
TYPES = [*sorted(ACTED_ON), "schools.updated", "terms.created", "resources.deleted", "users.x"]
# What the database cannot store, and text at the edges of what it can.
ODD_TEXT = [
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfffy",
    "",
    " ",
    "😀",
    "é" * 70,
    "a" * 600,
    "'; DROP TABLE accounts;--",
]
UNSTORABLE = ["\x00", "\ud800"]
FINAL = {str(s) for s in EventStatus.final()}

texts = st.one_of(st.text(max_size=12), st.sampled_from(ODD_TEXT))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated(draw: st.DrawFn, obj: Any, depth: int = 0) -> Any:
    """``obj`` with some of its fields (at any depth) replaced, removed or added."""
    if depth > 2 or draw(st.integers(0, 4)) == 0:
        return draw(json_values) if draw(st.booleans()) else obj
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            choice = draw(st.integers(0, 5))
            if choice == 0:
                continue  # removed
            out[key] = draw(mutated(value, depth + 1)) if choice == 1 else value
        out.update(draw(st.dictionaries(texts, json_values, max_size=2)))
        return out
    if isinstance(obj, list):
        return [draw(mutated(item, depth + 1)) for item in obj] + draw(
            st.lists(json_values, max_size=2)
        )
    return draw(json_values)


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The paths of ``obj``'s values that are no dict (or empty ones), at any depth."""
    if isinstance(obj, dict) and obj:
        return [p for key, value in obj.items() for p in _leaves(value, (*path, key))]
    if isinstance(obj, list) and obj:
        return [p for i, value in enumerate(obj) for p in _leaves(value, (*path, i))]
    return [path]


def _replaced(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy: Any = dict(obj) if isinstance(obj, dict) else list(obj)
    copy[path[0]] = _replaced(copy[path[0]], path[1:], value)
    return copy


@st.composite
def point_mutated(draw: st.DrawFn, obj: dict[str, Any]) -> dict[str, Any]:
    """A real object with one or two of its values replaced: its shape is otherwise intact, so
    the event reaches the rules, as a fuzzer of real rosters sends it."""
    for _ in range(draw(st.integers(1, 2))):
        texts_at = [p for p in _leaves(obj) if isinstance(_at(obj, p), str)]
        mangle = draw(st.booleans())
        if texts_at and mangle:
            # A real value with a character no database column takes in it.
            path = draw(st.sampled_from(texts_at))
            obj = _replaced(obj, path, _at(obj, path) + draw(st.sampled_from(UNSTORABLE)))
        else:
            path = draw(st.sampled_from(_leaves(obj)))
            obj = _replaced(obj, path, draw(json_values))
    return obj


def _at(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


KINDS = {
    "user": (ROSTER["users"], ["users.created", "users.updated", "users.deleted"]),
    "section": (ROSTER["sections"], ["sections.created", "sections.updated", "sections.deleted"]),
    "district": (ROSTER["districts"], ["districts.updated", "districts.deleted"]),
}


@st.composite
def clever_events(draw: st.DrawFn) -> dict[str, Any]:
    objects, types = KINDS[draw(st.sampled_from(sorted(KINDS)))]
    real = draw(st.sampled_from(objects))
    if draw(st.integers(0, 3)):
        obj = draw(point_mutated(real))
        event_type = draw(st.sampled_from(types))
    else:
        obj = draw(mutated(real))
        event_type = draw(st.sampled_from(TYPES) | texts)
    data: dict[str, Any] = {"object": obj}
    if event_type.endswith(".updated") and draw(st.booleans()):
        previous = {"roles": real.get("roles", {}), "students": real.get("students", [])}
        data["previous_attributes"] = draw(point_mutated(previous))
    event: dict[str, Any] = {
        "id": f"gen-{uuid.uuid4().hex}",
        "type": event_type,
        "created": draw(st.sampled_from(["2026-11-01T00:00:00Z"] * 8 + ["yesterday"]) | json_values)
        if draw(st.integers(0, 4))
        else "2026-11-01T00:00:00Z",
        "data": data,
    }
    if draw(st.integers(0, 9)) == 0:
        del event[draw(st.sampled_from(["id", "type", "created", "data"]))]
    return event


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A body and its headers: mostly signed events, else junk or a bad signature."""
    kind = draw(st.sampled_from(["event"] * 6 + ["json", "bytes", "unsigned", "forged"]))
    if kind in ("event", "unsigned", "forged"):
        body = json.dumps(draw(clever_events())).encode()
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    else:
        body = draw(st.binary(max_size=64))
    headers = {"content-type": "application/json"}
    if kind == "unsigned":
        return body, headers
    signed = signed_headers(SECRET, body)
    if kind == "forged":
        signed["webhook-signature"] = draw(st.sampled_from(["v1,AAAA", "", "v1,", "x"]))
    return body, {**headers, **signed}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_databases: PgDatabases) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("bad-input")
    roster = tmp / "roster.json"
    roster.write_text(json.dumps(ROSTER))
    url = pg_databases.new()
    with running_stack(tmp, url, seed=roster, RETRY_BACKOFF_MAX="1") as running:
        yield running


def _statuses(url: str, ids: list[str]) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id, status FROM roster_events WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {str(event_id): str(status) for event_id, status in rows}


def _dead_letters(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT task, error FROM dead_letters").fetchall()
    return [(str(task), str(error)) for task, error in rows]


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(requests(), min_size=1, max_size=5))
def test_no_request_gets_a_5xx_or_a_dead_letter_and_every_accepted_event_ends_final(
    stack: Stack, batch: list[tuple[bytes, dict[str, str]]]
) -> None:
    accepted: list[str] = []
    for body, headers in batch:
        response = httpx.post(
            f"{stack.base}/webhooks/clever", content=body, headers=headers, timeout=30
        )
        assert response.status_code in (202, 400, 401), (response.status_code, response.text)
        if response.status_code == 202:
            accepted.append(response.json()["event"])
    url = stack.database_url
    started = time.monotonic()

    def settled() -> tuple[dict[str, str]] | None:
        found = _statuses(url, accepted)
        in_flight = [s for s in found.values() if s in ("accepted", "processing")]
        return None if in_flight else (found,)

    result = wait_until(settled, timeout=60, what="every accepted event to be processed")
    assert result is not None
    (found,) = result
    assert set(found) == set(accepted)
    assert _dead_letters(url) == []
    assert set(found.values()) <= FINAL, found
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("event_type", "field", "value", "named"),
    [
        ("users.updated", "district", "\x00", "data.object.district"),
        ("users.created", "district", "x\x00", "data.object.district"),
        ("users.updated", "name", {"first": "\ud800", "last": "Lee"}, "data.object.name.first"),
        ("sections.updated", "name", "Math\x00", "data.object.name"),
    ],
    ids=["nul-district", "nul-new-user", "lone-surrogate", "nul-section"],
)
def test_a_value_the_database_cannot_store_rejects_its_event_naming_the_field(
    stack: Stack, event_type: str, field: str, value: Any, named: str
) -> None:
    """The cases a fuzzer of real rosters found dead-lettered: rejected at the inbox, the field
    named and the value not repeated, before any rule ran."""
    real = ROSTER["users"][0] if event_type.startswith("users") else ROSTER["sections"][0]
    obj = {**real, field: value}
    if event_type == "users.created":
        obj["id"] = f"new-{uuid.uuid4().hex[:12]}"
    event = clever_event(f"bad-{uuid.uuid4().hex}", event_type, obj, created="2026-11-01T00:00:00Z")

    response = stack.post(event)

    assert response.status_code == 202
    detail = stack.event(event["id"])
    assert detail["status"] == "rejected"
    assert detail["error"].startswith(f"{named}: contains a ")
    assert detail["attempts"] == 0 and detail["dead_letters"] == []
    assert _dead_letters(stack.database_url) == []
