"""The operations HTTP API, SPEC §5.4–5.5, what every route shares: the token, the health routes,
and input the database cannot store or bodies too large, refused before any route runs. The real
app over HTTP (TestClient), a real database seeded with the example district, and the machine's
Redis where a broker must answer. The route families are in ``test_ops_api_*.py``.
"""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from tests.support.app_env import CLOSED_BROKER, CLOSED_DATABASE, Configure, assert_error
from tests.support.databases import PgDatabases
from tests.support.ops_api import AUTH, LIVE_BROKER, TOKEN, get
from tests.support.scenario import DISTRICT
from worker import ops_api
from worker.api import app

# --------------------------------------------------------------------------------------------
# The token

SPEC_OPS_ROUTES = {
    ("GET", "/ops/status"),
    ("GET", "/ops/events"),
    ("GET", "/ops/events/{event_id}"),
    ("POST", "/ops/events/{event_id}/replay"),
    ("GET", "/ops/districts/{district_id}/preview"),
    ("POST", "/ops/districts/{district_id}/exit"),
    ("GET", "/ops/accounts/{account_id}"),
    ("GET", "/ops/accounts/{account_id}/district-reports"),
}
# Every route of the app under /ops (the ops router's, as FastAPI mounts a router whole).
OPS_ROUTES = sorted(
    (method, route.path)
    for route in [*app.routes, *ops_api.router.routes]
    if isinstance(route, APIRoute) and route.path.startswith("/ops/")
    for method in route.methods or ()
)


def test_every_spec_ops_route_is_served() -> None:
    assert set(OPS_ROUTES) >= SPEC_OPS_ROUTES


@pytest.mark.parametrize(
    ("ops_token", "headers"),
    [
        (TOKEN, {}),
        (TOKEN, {"Authorization": "Bearer not-the-token"}),
        (TOKEN, {"Authorization": f"Bearer {TOKEN}x"}),
        (TOKEN, {"Authorization": f"Basic {TOKEN}"}),
        (TOKEN, {"Authorization": TOKEN}),
        (None, {}),
        (None, {"Authorization": "Bearer "}),
        (None, {"Authorization": "Bearer anything"}),
    ],
    ids=[
        "no-header",
        "wrong-token",
        "token-prefix",
        "basic-scheme",
        "bare-token",
        "unset-no-header",
        "unset-empty-bearer",
        "unset-any-bearer",
    ],
)
@pytest.mark.parametrize(("method", "path"), OPS_ROUTES, ids=[" ".join(r) for r in OPS_ROUTES])
def test_ops_route_without_the_right_token_is_refused_with_401(
    configure: Configure,
    method: str,
    path: str,
    ops_token: str | None,
    headers: dict[str, str],
) -> None:
    # The database is unreachable: a 401 (not a 503) shows the token is checked first.
    configure(DATABASE_URL=CLOSED_DATABASE, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=ops_token)
    with TestClient(app) as client:
        response = client.request(method, re.sub(r"\{[^}]+\}", "x", path), headers=headers)

    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


NO_TOKEN = "no bearer token: send 'Authorization: Bearer <OPS_TOKEN>'"
NOT_BEARER = (
    "the Authorization header holds no bearer token: send 'Authorization: Bearer <OPS_TOKEN>'"
)
WRONG_TOKEN = "the bearer token is not this server's OPS_TOKEN nor an operator's"
NO_OPS_TOKEN = "this server has no OPS_TOKEN set: its ops API refuses every request"


@pytest.mark.parametrize(
    ("ops_token", "headers", "message"),
    [
        (TOKEN, {}, NO_TOKEN),
        (TOKEN, {"Authorization": "   "}, NO_TOKEN),
        (TOKEN, {"Authorization": "Bearer "}, NOT_BEARER),
        (TOKEN, {"Authorization": f"Basic {TOKEN}"}, NOT_BEARER),
        (TOKEN, {"Authorization": TOKEN}, NOT_BEARER),
        (TOKEN, {"Authorization": "Bearer not-the-token"}, WRONG_TOKEN),
        (TOKEN, {"Authorization": f"Bearer {TOKEN}x"}, WRONG_TOKEN),
        (None, {}, NO_OPS_TOKEN),
        (None, {"Authorization": "Bearer anything"}, NO_OPS_TOKEN),
    ],
    ids=[
        "no-header",
        "blank-header",
        "empty-bearer",
        "basic-scheme",
        "bare-token",
        "wrong-token",
        "token-prefix",
        "unset-no-header",
        "unset-any-bearer",
    ],
)
def test_a_refused_caller_is_told_whether_the_token_was_missing_or_wrong(
    configure: Configure, ops_token: str | None, headers: dict[str, str], message: str
) -> None:
    configure(DATABASE_URL=CLOSED_DATABASE, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=ops_token)
    with TestClient(app) as client:
        response = client.get("/ops/status", headers=headers)

    assert_error(response, 401, "unauthorized")
    assert response.json()["message"] == message
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("path", ["/ops/docs", "/ops/openapi.json"])
def test_api_description_is_not_served_to_anyone(configure: Configure, path: str) -> None:
    configure(DATABASE_URL=CLOSED_DATABASE, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=TOKEN)
    with TestClient(app, headers={"authorization": f"Bearer {TOKEN}"}) as client:
        response = client.get(path)

    assert response.status_code == 404


def test_metrics_are_served_in_prometheus_text_format(client: TestClient) -> None:
    response = get(client, "/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")


# --------------------------------------------------------------------------------------------
# Health


def test_healthz_answers_without_a_token_even_with_everything_down(configure: Configure) -> None:
    configure(DATABASE_URL=CLOSED_DATABASE, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=TOKEN)
    with TestClient(app) as client:
        response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_200_when_database_and_broker_answer(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=LIVE_BROKER, OPS_TOKEN=TOKEN)
    with TestClient(app) as client:
        response = client.get("/readyz")

    assert response.status_code == 200
    body = response.json()
    # No worker has run a heartbeat yet: a receiver just up is given time (tests/test_heartbeat).
    assert body.pop("heartbeat").startswith("ok: no heartbeat yet")
    assert body == {"ready": True, "database": "ok", "broker": "ok"}


def test_readyz_is_503_naming_the_broker_when_it_is_down(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=TOKEN)
    with TestClient(app) as client:
        response = client.get("/readyz")

    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False and body["database"] == "ok"
    assert body["broker"].startswith("unavailable")


def test_readyz_is_503_naming_the_database_when_it_is_down(configure: Configure) -> None:
    configure(DATABASE_URL=CLOSED_DATABASE, BROKER_URL=LIVE_BROKER, OPS_TOKEN=TOKEN)
    with TestClient(app) as client:
        response = client.get("/readyz")

    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False and body["broker"] == "ok"
    assert body["database"].startswith("unavailable")


# --------------------------------------------------------------------------------------------
# Input the database cannot store, and bodies too large: 4xx before any route runs


@pytest.mark.parametrize(
    ("path", "where"),
    [
        ("/ops/events/%00", "path"),
        ("/ops/events/evt%00/replay", "path"),
        ("/ops/accounts/a%00b", "path"),
        ("/ops/events?status=x%00", "query.status"),
        ("/ops/events?type=users.deleted&status=dead%00", "query.status"),
        ("/ops/districts/d1/sync?dry_run=%00", "query.dry_run"),
    ],
)
def test_a_nul_in_an_ops_path_or_parameter_is_refused_with_400(
    seeded: TestClient, path: str, where: str
) -> None:
    method = "POST" if path.endswith("/replay") or "/sync" in path else "GET"

    response = seeded.request(method, path)

    assert_error(response, 400, "invalid_input")
    assert response.json()["message"] == (
        f"{where}: contains a NUL character, which the database cannot store"
    )
    # The same routes still answer what they hold.
    assert get(seeded, "/ops/events", status="dead").json() == []


def test_a_pause_whose_reason_holds_a_nul_is_refused_and_nothing_stored(
    seeded: TestClient,
) -> None:
    response = seeded.post(
        "/ops/pauses", json={"district": DISTRICT, "until": "2099-01-01", "reason": "winter\x00"}
    )

    assert_error(response, 422, "invalid_pause")
    assert response.json()["message"] == (
        "reason: contains a NUL character, which the database cannot store"
    )
    assert seeded.get("/ops/pauses").json() == []


def test_an_ops_body_over_one_mebibyte_is_refused_with_413(seeded: TestClient) -> None:
    reason = "x" * (1024 * 1024)
    body = {"district": DISTRICT, "until": "2099-01-01", "reason": reason}

    declared = seeded.post("/ops/pauses", json=body)
    chunked = seeded.post(
        "/ops/pauses",
        content=iter([b'{"district": null, "until": "2099-01-01", "reason": "', reason.encode()]),
        headers={"content-type": "application/json"},
    )

    assert_error(declared, 413, "body_too_large")
    assert "content-length" not in chunked.request.headers
    assert_error(chunked, 413, "body_too_large")
    assert declared.json()["message"] == "the body is over 1 MiB (1048576 bytes)"
    assert seeded.get("/ops/pauses").json() == []


def test_a_nul_in_a_json_field_of_an_ops_request_is_refused_with_400(
    configure: Configure, pg_databases: PgDatabases
) -> None:
    # Postgres text cannot hold a NUL (SQLite's can): what a body carries to the database.
    configure(DATABASE_URL=pg_databases.new(), BROKER_URL=CLOSED_BROKER, OPS_TOKEN=TOKEN)
    group = {"task": "grassroots.process_event\x00", "error": "e", "up_to": 1}
    with TestClient(app, headers=AUTH) as client:
        response = client.post("/ops/dead-letters/replay", json=group)

    assert_error(response, 400, "invalid_input")
    assert response.json()["message"] == (
        "the database cannot store a value of this request:"
        " PostgreSQL text fields cannot contain NUL (0x00) bytes"
    )
