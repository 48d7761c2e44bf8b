"""The webhook receiver, SPEC §5.2: the real app over HTTP (TestClient), the real inbox tables.

Every test reads back what the inbox holds, so "accepted" means committed and "refused" means
nothing was stored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from models import RosterEvent
from tests.support.app_env import CLOSED_BROKER, CLOSED_DATABASE, Configure, assert_error
from tests.support.cli import grassroots
from tests.support.scenario import DISTRICT, STEVE
from tests.support.stack import spare_port
from worker import db
from worker.api import app
from worker.http import MAX_BODY
from worker.signing import signed_headers

URL = "/webhooks/clever"
JSON = {"content-type": "application/json"}
OLD_SECRET = "whsec_" + base64.b64encode(b"grassroots-old-webhook-secret-32b").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"grassroots-new-webhook-secret-32b").decode()
STRANGER_SECRET = "whsec_" + base64.b64encode(b"somebody-else-webhook-secret-32b").decode()
SECRET = NEW_SECRET
# Nothing listens on port 1: connecting fails at once.
BROKER_DOWN_LOG = "broker unavailable"


@pytest.fixture
def client(configure: Configure, database_url: str) -> Iterator[TestClient]:
    """The receiver over a fresh inbox, with WEBHOOK_SECRETS set and the broker down."""
    configure(
        DATABASE_URL=database_url,
        BROKER_URL=CLOSED_BROKER,
        WEBHOOK_SECRETS=SECRET,
        OPS_TOKEN=None,
    )
    with TestClient(app) as test_client:
        yield test_client


def clever_event(event_id: str = "evt-0001", **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": event_id,
        "type": "users.updated",
        "created": "2025-09-03T14:05:21.900Z",
        "data": {"object": {"id": STEVE, "district": DISTRICT}},
    }
    event.update(fields)
    return event


def _ahead(by: timedelta) -> str:
    return (datetime.now(UTC) + by).isoformat()


def encode(event: Any) -> bytes:
    return json.dumps(event).encode()


def post(
    client: TestClient,
    body: bytes,
    *,
    secret: str = SECRET,
    content_type: str | None = "application/json",
) -> httpx.Response:
    headers = signed_headers(secret, body)
    if content_type is not None:
        headers["content-type"] = content_type
    response: httpx.Response = client.post(URL, content=body, headers=headers)
    return response


def inbox() -> list[RosterEvent]:
    with db.session_scope() as session:
        return list(session.scalars(select(RosterEvent).order_by(RosterEvent.id)))


# --------------------------------------------------------------------------------------------
# Accepted, once


def test_new_event_is_committed_to_the_inbox_before_202_accepted(client: TestClient) -> None:
    response = post(client, encode(clever_event("evt-new")))

    assert response.status_code == 202
    assert response.json() == {"event": "evt-new", "status": "accepted"}
    [stored] = inbox()
    assert (stored.id, stored.type, stored.source) == ("evt-new", "users.updated", "webhook")
    assert stored.status == "accepted"
    assert stored.payload == clever_event("evt-new")


def test_same_event_id_again_is_a_duplicate_and_stays_one_row(client: TestClient) -> None:
    first = post(client, encode(clever_event("evt-dup")))
    # A redelivery carries a new signature; a resend with a changed body keeps the first payload.
    again = post(client, encode(clever_event("evt-dup")))
    changed = post(client, encode(clever_event("evt-dup", type="users.deleted")))

    assert first.json() == {"event": "evt-dup", "status": "accepted"}
    for response in (again, changed):
        assert response.status_code == 202
        assert response.json() == {"event": "evt-dup", "status": "duplicate"}
    [stored] = inbox()
    assert stored.type == "users.updated" and stored.payload == clever_event("evt-dup")


def test_event_accepted_while_broker_is_down_is_kept_for_the_relay(
    configure: Configure, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, WEBHOOK_SECRETS=SECRET)
    # The answer comes once the row is committed; the send to the workers follows it, and the
    # receiver finishes its sends before it shuts down.
    with caplog.at_level(logging.WARNING, logger="grassroots.tasks"), TestClient(app) as client:
        response = post(client, encode(clever_event("evt-no-broker")))

    assert response.status_code == 202
    assert response.json() == {"event": "evt-no-broker", "status": "accepted"}
    assert any(BROKER_DOWN_LOG in record.getMessage() for record in caplog.records)
    assert [(ev.id, ev.status) for ev in inbox()] == [("evt-no-broker", "accepted")]


# --------------------------------------------------------------------------------------------
# 415


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonp"],
)
def test_body_that_is_not_declared_json_is_refused_with_415(
    client: TestClient, content_type: str | None
) -> None:
    response = post(client, encode(clever_event()), content_type=content_type)

    assert_error(response, 415)
    assert inbox() == []


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON;charset=UTF-8"]
)
def test_json_with_a_charset_parameter_is_accepted(client: TestClient, content_type: str) -> None:
    response = post(client, encode(clever_event("evt-charset")), content_type=content_type)

    assert response.status_code == 202
    assert [ev.id for ev in inbox()] == ["evt-charset"]


# --------------------------------------------------------------------------------------------
# 413


def padded_event(size: int) -> bytes:
    """A valid event whose JSON is exactly ``size`` bytes."""
    skeleton = encode(clever_event("evt-big", padding=""))
    body = encode(clever_event("evt-big", padding="x" * (size - len(skeleton))))
    assert len(body) == size
    return body


def test_event_of_exactly_one_mebibyte_is_accepted(client: TestClient) -> None:
    response = post(client, padded_event(MAX_BODY))

    assert response.status_code == 202
    assert [ev.id for ev in inbox()] == ["evt-big"]


def test_body_over_one_mebibyte_with_content_length_is_refused_with_413(
    client: TestClient,
) -> None:
    response = post(client, padded_event(MAX_BODY + 1))

    assert response.request.headers["content-length"] == str(MAX_BODY + 1)
    assert_error(response, 413)
    assert inbox() == []


def test_chunked_body_over_one_mebibyte_without_content_length_is_refused_with_413(
    client: TestClient,
) -> None:
    body = padded_event(MAX_BODY + 1)
    chunk = 64 * 1024
    headers = {**signed_headers(SECRET, body), **JSON}

    response = client.post(
        URL,
        content=iter([body[i : i + chunk] for i in range(0, len(body), chunk)]),
        headers=headers,
    )

    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413)
    assert inbox() == []


def test_streamed_body_stops_being_read_once_past_one_mebibyte(client: TestClient) -> None:
    """TestClient buffers a request body before the app sees it, so this one goes through
    httpx's ASGI transport, which hands the app one chunk each time it asks."""
    chunk, chunks = 64 * 1024, 1024  # 64 MiB on offer
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(chunks):
            pulled += 1
            yield b" " * chunk

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as http:
            return await http.post(URL, content=body(), headers=JSON)

    response = asyncio.run(send())

    assert_error(response, 413)
    assert pulled <= MAX_BODY // chunk + 1
    assert inbox() == []


# --------------------------------------------------------------------------------------------
# 401


@pytest.mark.parametrize(
    "dropped",
    [
        ("webhook-id", "webhook-timestamp", "webhook-signature"),
        ("webhook-id",),
        ("webhook-timestamp",),
        ("webhook-signature",),
    ],
    ids=["all", "id", "timestamp", "signature"],
)
def test_missing_signature_headers_are_refused_with_401_and_nothing_stored(
    client: TestClient, dropped: tuple[str, ...]
) -> None:
    body = encode(clever_event())
    headers = {**signed_headers(SECRET, body), **JSON}
    for name in dropped:
        del headers[name]

    response = client.post(URL, content=body, headers=headers)

    assert_error(response, 401, "missing_headers")
    assert inbox() == []


def test_signature_from_an_unknown_secret_is_refused_with_401(client: TestClient) -> None:
    response = post(client, encode(clever_event()), secret=STRANGER_SECRET)

    assert_error(response, 401, "bad_signature")
    assert inbox() == []


def test_body_changed_after_signing_is_refused_with_401(client: TestClient) -> None:
    signed = encode(clever_event("evt-signed"))
    headers = {**signed_headers(SECRET, signed), **JSON}

    response = client.post(URL, content=encode(clever_event("evt-forged")), headers=headers)

    assert_error(response, 401, "bad_signature")
    assert inbox() == []


def test_unsigned_garbage_is_refused_with_401_not_400(client: TestClient) -> None:
    response = post(client, b"not json at all", secret=STRANGER_SECRET)

    assert_error(response, 401, "bad_signature")
    assert inbox() == []


# 10 s past the limit: int(time.time()) and the request's own run time cannot eat that margin.
@pytest.mark.parametrize(
    "offset", [-310, -3600, 310, 3600], ids=["5m10s-old", "1h-old", "5m10s-ahead", "1h-ahead"]
)
def test_timestamp_more_than_five_minutes_off_is_refused_with_401(
    client: TestClient, offset: int
) -> None:
    body = encode(clever_event())
    headers = {**signed_headers(SECRET, body, timestamp=int(time.time()) + offset), **JSON}

    response = client.post(URL, content=body, headers=headers)

    assert_error(response, 401, "stale_timestamp")
    assert inbox() == []


@pytest.mark.parametrize("offset", [-240, 240], ids=["4m-old", "4m-ahead"])
def test_timestamp_within_five_minutes_is_accepted(client: TestClient, offset: int) -> None:
    body = encode(clever_event("evt-skewed"))
    headers = {**signed_headers(SECRET, body, timestamp=int(time.time()) + offset), **JSON}

    response = client.post(URL, content=body, headers=headers)

    assert response.status_code == 202
    assert [ev.id for ev in inbox()] == ["evt-skewed"]


# --------------------------------------------------------------------------------------------
# Secret rotation


def test_events_signed_with_either_rotated_secret_are_accepted(
    configure: Configure, database_url: str
) -> None:
    configure(
        DATABASE_URL=database_url,
        BROKER_URL=CLOSED_BROKER,
        WEBHOOK_SECRETS=f"{OLD_SECRET}, {NEW_SECRET}",
    )
    with TestClient(app) as client:
        old = post(client, encode(clever_event("evt-old")), secret=OLD_SECRET)
        new = post(client, encode(clever_event("evt-new")), secret=NEW_SECRET)
        stranger = post(client, encode(clever_event("evt-stranger")), secret=STRANGER_SECRET)

    assert old.json() == {"event": "evt-old", "status": "accepted"}
    assert new.json() == {"event": "evt-new", "status": "accepted"}
    assert_error(stranger, 401, "bad_signature")
    assert [ev.id for ev in inbox()] == ["evt-new", "evt-old"]


def test_receiver_without_a_configured_secret_accepts_nothing(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, WEBHOOK_SECRETS=None)
    with TestClient(app) as client:
        response = post(client, encode(clever_event()))

    assert_error(response, 503)
    assert inbox() == []


def test_a_malformed_webhook_secret_keeps_the_receiver_from_starting(tmp_path: Path) -> None:
    # Refused with the other settings, before anything listens: never a receiver that refuses
    # every webhook.
    result = grassroots(
        tmp_path, "serve", "--port", str(spare_port()), WEBHOOK_SECRETS="whsec_not*base64"
    )

    assert result.returncode == 1
    assert result.stderr == (
        "grassroots: WEBHOOK_SECRETS: secret 1: webhook secret is not valid base64 (expected"
        " whsec_<base64>)\n"
    )


# --------------------------------------------------------------------------------------------
# 400 and rejected


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "invalid_json"),
        (b'{"id": "evt-cut", "type": "users.up', "invalid_json"),
        (b"\xff\xfe\x00{", "invalid_json"),
        (encode({"type": "users.updated", "data": {"object": {"id": "u"}}}), "invalid_event"),
        (encode({"id": "evt-untyped", "data": {"object": {"id": "u"}}}), "invalid_event"),
        (encode({"id": "", "type": "users.updated"}), "invalid_event"),
        (encode({"id": 17, "type": "users.updated"}), "invalid_event"),
        (encode([clever_event()]), "invalid_event"),
        (encode(clever_event("evt-\u0000")), "invalid_event"),
        (b'{"id": "evt-nan", "type": "users.updated", "created": NaN}', "invalid_json"),
        (b'{"id": "evt-inf", "type": "users.updated", "x": [-Infinity]}', "invalid_json"),
        (b'{"id": "evt-huge", "type": "users.updated", "x": 1e999}', "invalid_json"),
        (b'{"id": "evt-deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "invalid_json"),
        (b'{"id": "evt-1", "type": "users.updated\\udc00"}', "invalid_event"),
    ],
    ids=[
        "text",
        "truncated",
        "not-utf8",
        "no-id",
        "no-type",
        "empty-id",
        "int-id",
        "array",
        "nul-id",
        "nan",
        "infinity",
        "number-too-large",
        "nested-too-deeply",
        "lone-surrogate-type",
    ],
)
def test_signed_body_that_is_not_an_event_is_refused_with_400_and_nothing_stored(
    client: TestClient, body: bytes, code: str
) -> None:
    response = post(client, body)

    assert_error(response, 400, code)
    assert inbox() == []


def test_an_event_a_few_minutes_ahead_of_our_clock_is_accepted(client: TestClient) -> None:
    # The clocks' skew the signatures tolerate too.
    response = post(client, encode(clever_event("evt-skew", created=_ahead(timedelta(minutes=4)))))

    assert response.status_code == 202
    assert [(ev.id, ev.status) for ev in inbox()] == [("evt-skew", "accepted")]


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        ({"id": "evt-odd", "type": "users.updated"}, "data.object"),
        (clever_event("evt-odd", data={"object": STEVE}), "data.object"),
        (clever_event("evt-odd", data={"object": {"name": "no id"}}), "id"),
        (clever_event("evt-odd", data={"object": {"id": "u\u0000", "district": "d"}}), "id"),
        (clever_event("evt-odd", data={"object": {"id": "u\ud800", "district": "d"}}), "id"),
        (clever_event("evt-odd", created="last tuesday"), "created"),
        (clever_event("evt-odd", created=1725372321), "created"),
        (clever_event("evt-odd", created=None), "no 'created' time"),
        (clever_event("evt-odd", created="9999-12-31T23:59:59Z"), "minutes ahead"),
    ],
    ids=[
        "no-data",
        "object-not-a-dict",
        "object-without-id",
        "object-id-with-nul",
        "object-id-with-lone-surrogate",
        "created-text",
        "created-number",
        "created-null",
        "created-in-9999",
    ],
)
def test_signed_event_we_cannot_interpret_is_kept_as_rejected(
    configure: Configure,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    event: dict[str, Any],
    problem: str,
) -> None:
    kept_as_rejected(configure, database_url, caplog, event, problem)


def test_an_event_just_past_the_tolerance_ahead_of_our_clock_is_kept_as_rejected(
    configure: Configure, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Made when the test runs: a parameter is made at collection, minutes before.
    event = clever_event("evt-odd", created=_ahead(timedelta(minutes=6)))
    kept_as_rejected(configure, database_url, caplog, event, "minutes ahead")


def kept_as_rejected(
    configure: Configure,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    event: dict[str, Any],
    problem: str,
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, WEBHOOK_SECRETS=SECRET)
    # Read the log after shutdown, by which time the receiver has made every send it meant to.
    with caplog.at_level(logging.WARNING, logger="grassroots.tasks"), TestClient(app) as client:
        response = post(client, encode(event))

    assert response.status_code == 202
    assert response.json() == {"event": "evt-odd", "status": "accepted"}
    [stored] = inbox()
    assert stored.status == "rejected"
    assert stored.error is not None and problem in stored.error
    assert stored.payload == event
    # Nothing is sent to the workers for it: no attempt was made to reach the (absent) broker.
    assert not any(BROKER_DOWN_LOG in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    "event",
    [
        # Clever v3.0's Resource has no id at all.
        clever_event(
            "evt-other",
            type="resources.created",
            data={"object": {"sourcedId": "r-1", "district": DISTRICT, "roles": ["student"]}},
        ),
        clever_event(
            "evt-other",
            type="schools.updated",
            data={"object": {"id": "sch-1", "district": DISTRICT, "name": "Example Elementary"}},
            previous_attributes={"name": "Example Elementary School"},
        ),
        clever_event("evt-other", type="terms.deleted", data={"object": "not an object"}),
        {"id": "evt-other", "type": "districts.updated", "created": "last tuesday"},
    ],
    ids=["resource-without-id", "school", "term-with-odd-object", "district-without-data"],
)
def test_signed_event_of_a_resource_we_do_not_act_on_is_kept_as_ignored_with_the_reason(
    configure: Configure,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    event: dict[str, Any],
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, WEBHOOK_SECRETS=SECRET)
    with caplog.at_level(logging.WARNING, logger="grassroots.tasks"), TestClient(app) as client:
        response = post(client, encode(event))
        again = post(client, encode(event))

    assert response.status_code == 202
    assert response.json() == {"event": "evt-other", "status": "accepted"}
    assert again.json() == {"event": "evt-other", "status": "duplicate"}
    [stored] = inbox()
    assert stored.status == "ignored"
    assert stored.error == f"event type {event['type']} does not concern conversions"
    assert stored.payload == event
    # Nothing for the workers to do: no attempt was made to reach the (absent) broker.
    assert not any(BROKER_DOWN_LOG in record.getMessage() for record in caplog.records)


def test_signed_users_event_of_a_contact_is_accepted_for_the_workers(client: TestClient) -> None:
    parent = {
        "id": "5f8e2c1a9b7d4e0012ab0005",
        "district": DISTRICT,
        "roles": {"contact": {"student_relationships": [{"student": STEVE}]}},
    }
    response = post(client, encode(clever_event("evt-parent", data={"object": parent})))

    assert response.json() == {"event": "evt-parent", "status": "accepted"}
    assert [(ev.id, ev.status, ev.object_id) for ev in inbox()] == [
        ("evt-parent", "accepted", parent["id"])
    ]


def test_rejected_event_sent_again_is_a_duplicate(client: TestClient) -> None:
    event = {"id": "evt-odd", "type": "users.updated"}
    post(client, encode(event))

    response = post(client, encode(event))

    assert response.json() == {"event": "evt-odd", "status": "duplicate"}
    assert [(ev.id, ev.status) for ev in inbox()] == [("evt-odd", "rejected")]


# --------------------------------------------------------------------------------------------
# 503


def test_unreachable_database_answers_503_quickly_so_the_sender_retries(
    configure: Configure,
) -> None:
    configure(DATABASE_URL=CLOSED_DATABASE, BROKER_URL=CLOSED_BROKER, WEBHOOK_SECRETS=SECRET)
    with TestClient(app) as client:
        started = time.monotonic()
        response = post(client, encode(clever_event()))
        elapsed = time.monotonic() - started

    assert_error(response, 503, "database_unavailable")
    assert elapsed < 5, f"a 503 for a dead database took {elapsed:.1f}s"
