"""The operations HTTP API, SPEC §5.4–5.5: the real app over HTTP (TestClient), a real database
seeded with the example district, and the machine's Redis where a broker must answer."""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from models import (
    Account,
    Assignment,
    AuditRecord,
    Class,
    ClassTeacher,
    DeadLetter,
    District,
    Enrollment,
    ExitUnit,
    Goal,
    JournalEntry,
    ReportAccess,
    RosterEvent,
    utcnow,
)
from tasks import conversion, events, exits
from tasks.inbox import ingest
from tasks.roster import load_snapshot
from tasks.view import DISTRICT_ACCESS_ENDED
from tests.support.app_env import CLOSED_BROKER, CLOSED_DATABASE, Configure, assert_error
from tests.support.databases import PgDatabases
from tests.support.scenario import (
    DISTRICT,
    KIM,
    LEO,
    MARIA,
    PAT,
    PEOPLE,
    RIVERA,
    S1,
    S2,
    SAM,
    STEVE,
    example,
)
from tests.support.stack import OPS_TOKEN, RedisServer
from worker import db, ops_api
from worker.api import app
from worker.celery_app import QUEUES
from worker.celery_app import app as celery_app

TOKEN = OPS_TOKEN
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Nothing listens on port 1: connecting fails at once.
# The machine's Redis, on a database nothing else in the project uses.
LIVE_BROKER = "redis://127.0.0.1:6379/15"
TRIGGER = "test"

VIEW_KEYS = {
    "id",
    "clever_id",
    "email",
    "kind",
    "status",
    "roles",
    "district",
    "district_reports",
    "classes",
    "goals",
    "assignments",
    "coaches",
    "students",
    "progress",
}


@pytest.fixture
def client(configure: Configure, database_url: str) -> Iterator[TestClient]:
    """The ops API with its token, over a fresh database; the broker is down."""
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=TOKEN)
    with TestClient(app, headers=AUTH) as test_client:
        yield test_client


def seed(policy: str = "convert") -> None:
    with db.session_scope() as session:
        load_snapshot(session, example(policy))


@pytest.fixture
def seeded(client: TestClient) -> TestClient:
    seed()
    return client


def get(client: TestClient, path: str, **params: str | int) -> httpx.Response:
    response: httpx.Response = client.get(path, params=params)
    return response


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
# Account view (SPEC §5.4)


def test_account_view_by_clever_id_is_the_spec_shape(seeded: TestClient) -> None:
    response = get(seeded, f"/ops/accounts/{STEVE}")

    assert response.status_code == 200
    assert response.json() == {
        "id": STEVE,
        "clever_id": STEVE,
        "email": "s.ziemann@students.example-isd.org",
        "kind": "district",
        "status": "active",
        "roles": ["student"],
        "district": DISTRICT,
        "district_reports": "denied",
        "classes": [
            {"id": S1, "name": "Grade 5 Math - Period 1", "district_synced": True},
            {"id": S2, "name": "Grade 5 Math - Period 2 (co-taught)", "district_synced": True},
            {"id": "class-math-club", "name": "After-school Math Club", "district_synced": False},
        ],
        "goals": [
            {"id": "goal-club-fractions", "class": "class-math-club"},
            {"id": "goal-g5-math", "class": S1},
        ],
        "assignments": [{"id": "asg-p2-decimals", "class": S2}],
        "coaches": [RIVERA, KIM],
        "students": [],
        "progress": [
            {"skill": "add-fractions", "points": 450, "mastery": "mastered"},
            {"skill": "decimals-intro", "points": 120, "mastery": "familiar"},
            {"skill": "place-value", "points": 300, "mastery": "proficient"},
        ],
    }


def test_account_view_by_platform_id_is_the_spec_shape(seeded: TestClient) -> None:
    response = get(seeded, f"/ops/accounts/{SAM}")

    assert response.status_code == 200
    assert response.json() == {
        "id": SAM,
        "clever_id": None,
        "email": "sam.taylor@example.com",
        "kind": "grassroots",
        "status": "active",
        "roles": ["teacher"],
        "district": None,
        "district_reports": "denied",
        "classes": [
            {"id": "class-tutoring", "name": "Saturday Tutoring", "district_synced": False}
        ],
        "goals": [],
        "assignments": [{"id": "asg-tutoring-review", "class": "class-tutoring"}],
        "coaches": [],
        "students": [MARIA],
        "progress": [],
    }


def test_every_account_view_has_exactly_the_spec_fields(seeded: TestClient) -> None:
    for person in PEOPLE:
        view = get(seeded, f"/ops/accounts/{person}").json()
        assert set(view) == VIEW_KEYS
        assert view["id"] == person
        assert all(set(c) == {"id", "name", "district_synced"} for c in view["classes"])
        assert all(set(g) == {"id", "class"} for g in view["goals"] + view["assignments"])
        assert all(set(p) == {"skill", "points", "mastery"} for p in view["progress"])
        assert view["roles"] == sorted(view["roles"])


def test_unknown_account_is_404(seeded: TestClient) -> None:
    assert_error(get(seeded, "/ops/accounts/5f8e2c1a9b7d4e00deadbeef"), 404, "not_found")


# --------------------------------------------------------------------------------------------
# District reports


@pytest.mark.parametrize("admin", [PAT, RIVERA])
def test_active_district_admin_may_open_district_reports(seeded: TestClient, admin: str) -> None:
    response = get(seeded, f"/ops/accounts/{admin}/district-reports")

    assert response.status_code == 200
    assert response.json() == {"account": admin, "district": DISTRICT, "access": "allowed"}


def test_district_teacher_who_is_not_an_admin_is_refused_district_reports(
    seeded: TestClient,
) -> None:
    response = get(seeded, f"/ops/accounts/{KIM}/district-reports")

    assert_error(response, 403)
    assert response.json()["error"] != "district_access_ended"


def test_converted_admin_gets_district_access_ended(seeded: TestClient) -> None:
    with db.session_scope() as session:
        conversion.convert_account(session, PAT, trigger=TRIGGER)

    response = get(seeded, f"/ops/accounts/{PAT}/district-reports")

    assert_error(response, 403, "district_access_ended")
    assert response.json()["message"] == DISTRICT_ACCESS_ENDED
    assert get(seeded, f"/ops/accounts/{PAT}").json()["district_reports"] == "denied"


@pytest.mark.parametrize("admin", [PAT, RIVERA])
def test_admins_get_district_access_ended_after_exit_with_remove_policy(
    client: TestClient, admin: str
) -> None:
    seed("remove")
    with db.session_scope() as session:
        exits.run_in_process(session, DISTRICT, trigger=TRIGGER)

    response = get(client, f"/ops/accounts/{admin}/district-reports")

    assert_error(response, 403, "district_access_ended")
    assert response.json()["message"] == DISTRICT_ACCESS_ENDED


def test_district_reports_of_unknown_account_is_404(seeded: TestClient) -> None:
    assert_error(get(seeded, "/ops/accounts/nobody/district-reports"), 404, "not_found")


# --------------------------------------------------------------------------------------------
# Events


def put_event(event_id: str, type_: str, status: str, minutes_ago: int) -> None:
    """An inbox row as the receiver stores it, then moved to ``status`` at a known time."""
    raw = {
        "id": event_id,
        "type": type_,
        "created": "2025-09-03T14:05:21.900Z",
        "data": {"object": {"id": LEO, "district": DISTRICT}},
    }
    with db.session_scope() as session:
        ingest(session, raw, source="webhook")
        session.execute(
            update(RosterEvent)
            .where(RosterEvent.id == event_id)
            .values(status=status, received_at=utcnow() - timedelta(minutes=minutes_ago))
        )


@pytest.fixture
def inbox(client: TestClient) -> TestClient:
    put_event("evt-a", "users.updated", "accepted", minutes_ago=50)
    put_event("evt-b", "users.deleted", "done", minutes_ago=40)
    put_event("evt-c", "sections.updated", "rejected", minutes_ago=30)
    put_event("evt-d", "users.updated", "dead", minutes_ago=20)
    put_event("evt-e", "users.updated", "accepted", minutes_ago=10)
    put_event("evt-f", "users.deleted", "held", minutes_ago=5)
    return client


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["evt-f", "evt-e", "evt-d", "evt-c", "evt-b", "evt-a"]),
        ({"status": "accepted"}, ["evt-e", "evt-a"]),
        ({"status": "dead"}, ["evt-d"]),
        ({"type": "users.updated"}, ["evt-e", "evt-d", "evt-a"]),
        ({"type": "users.deleted", "status": "done"}, ["evt-b"]),
        ({"status": "accepted", "type": "sections.updated"}, []),
        ({"status": "processing"}, []),
        ({"limit": 2}, ["evt-f", "evt-e"]),
        ({"type": "users.updated", "limit": 1}, ["evt-e"]),
        ({"status": "accepted", "limit": 1000}, ["evt-e", "evt-a"]),
    ],
    ids=[
        "all-newest-first",
        "status",
        "status-dead",
        "type",
        "type-and-status",
        "no-match",
        "status-none-in",
        "limit",
        "type-and-limit",
        "limit-max",
    ],
)
def test_event_listing_filters_by_status_and_type_and_limits(
    inbox: TestClient, params: dict[str, str | int], expected: list[str]
) -> None:
    response = get(inbox, "/ops/events", **params)

    assert response.status_code == 200
    rows = response.json()
    assert [row["id"] for row in rows] == expected
    for row in rows:
        assert set(row) >= {"id", "type", "status", "attempts", "error", "received_at"}
        assert params.get("status", row["status"]) == row["status"]
        assert params.get("type", row["type"]) == row["type"]


@pytest.mark.parametrize("limit", [0, 1001, "many", " "])
def test_event_listing_refuses_a_limit_out_of_range(inbox: TestClient, limit: int | str) -> None:
    assert get(inbox, "/ops/events", limit=limit).status_code == 422


def test_event_listing_takes_blank_parameters_as_not_given(inbox: TestClient) -> None:
    # The route as SPEC §5.5 writes it: /ops/events?status=&type=&limit=
    blank = get(inbox, "/ops/events", status="", type="", limit="")
    assert blank.status_code == 200
    assert blank.json() == get(inbox, "/ops/events").json() != []


def test_event_detail_shows_the_stored_event(inbox: TestClient) -> None:
    response = get(inbox, "/ops/events/evt-d")

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["type"], body["status"]) == ("evt-d", "users.updated", "dead")
    assert body["source"] == "webhook"
    assert body["object"] == {"type": "user", "id": LEO}
    assert body["district"] == DISTRICT
    assert body["dead_letters"] == []


def test_unknown_event_is_404(inbox: TestClient) -> None:
    assert_error(get(inbox, "/ops/events/evt-nope"), 404, "not_found")


def _audit_count(session: Session, action: str) -> int:
    return (
        session.scalar(
            select(func.count()).select_from(AuditRecord).where(AuditRecord.action == action)
        )
        or 0
    )


def _event(event_id: str) -> RosterEvent:
    with db.session_scope() as session:
        ev = session.scalar(select(RosterEvent).where(RosterEvent.id == event_id))
        assert ev is not None
        return ev


def test_replaying_an_applied_event_changes_nothing(seeded: TestClient) -> None:
    put_event("evt-leo-gone", "users.deleted", "accepted", minutes_ago=1)
    with db.session_scope() as session:
        # The brake would hold one removal out of six district accounts; it is not tested here.
        routed = events.process_event(session, "evt-leo-gone", events.Limits(brake_percent=100))
        assert routed is not None and routed.status == "done"
    before = _event("evt-leo-gone")
    leo_before = get(seeded, f"/ops/accounts/{LEO}").json()

    response = seeded.post("/ops/events/evt-leo-gone/replay")

    assert response.status_code == 202
    assert response.json() == {
        "event": "evt-leo-gone",
        "replayed": False,
        "status": "already_final",
    }
    after = _event("evt-leo-gone")
    assert (after.status, after.attempts, after.updated_at) == (
        "done",
        before.attempts,
        before.updated_at,
    )
    assert get(seeded, f"/ops/accounts/{LEO}").json() == leo_before
    with db.session_scope() as session:
        assert _audit_count(session, "replay") == 0


@pytest.mark.parametrize(
    ("event_id", "status", "outcome"),
    [("evt-e", "accepted", "in_flight"), ("evt-f", "held", "held")],
)
def test_replaying_an_event_in_flight_or_held_sends_no_second_copy(
    inbox: TestClient, event_id: str, status: str, outcome: str
) -> None:
    # As after a concurrent replay: a second copy would count its attempts against the first.
    before = _event(event_id)

    response = inbox.post(f"/ops/events/{event_id}/replay")

    assert response.status_code == 202
    assert response.json() == {"event": event_id, "replayed": False, "status": outcome}
    after = _event(event_id)
    assert (after.status, after.attempts, after.updated_at) == (
        status,
        before.attempts,
        before.updated_at,
    )
    with db.session_scope() as session:
        assert _audit_count(session, "replay") == 0


def test_concurrent_replays_of_a_dead_event_send_it_round_once(inbox: TestClient) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: inbox.post("/ops/events/evt-d/replay"), range(4)))

    assert sorted(a.json()["status"] for a in answers) == ["accepted"] + ["in_flight"] * 3
    with db.session_scope() as session:
        assert _audit_count(session, "replay") == 1


def test_replaying_a_dead_event_sends_it_round_again(inbox: TestClient) -> None:
    response = inbox.post("/ops/events/evt-d/replay")

    assert response.status_code == 202
    assert response.json() == {"event": "evt-d", "replayed": True, "status": "accepted"}
    # The broker is down: the event waits as accepted, for the relay.
    assert _event("evt-d").status == "accepted"
    with db.session_scope() as session:
        assert _audit_count(session, "replay") == 1


def test_replaying_an_unknown_event_is_404(inbox: TestClient) -> None:
    assert_error(inbox.post("/ops/events/evt-nope/replay"), 404, "not_found")


# --------------------------------------------------------------------------------------------
# District exit preview


def _world(session: Session) -> dict[str, Any]:
    """Everything a preview must not touch."""

    def count(model: Any, *where: Any) -> int:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

    def removed(model: Any) -> int:
        """Rows no reader sees any more: removed themselves, or hidden with their class."""
        if model is Class or not hasattr(model, "class_id"):
            return count(model, model.removed_by.is_not(None))
        gone = select(Class.id).where(Class.removed_by.is_not(None))
        return count(model, or_(model.removed_by.is_not(None), model.class_id.in_(gone)))

    return {
        "district": session.scalar(select(District.status).where(District.id == DISTRICT)),
        "accounts": session.execute(
            select(Account.id, Account.kind, Account.status, Account.district_id).order_by(
                Account.id
            )
        ).all(),
        "journal": count(JournalEntry),
        "audit": count(AuditRecord),
        "removed": {
            model.__name__: removed(model)
            for model in (Class, Enrollment, ClassTeacher, Goal, Assignment, ReportAccess)
        },
    }


@pytest.mark.parametrize("policy", ["convert", "remove"])
def test_exit_preview_changes_nothing_and_counts_what_the_exit_then_does(
    client: TestClient, policy: str
) -> None:
    seed(policy)
    with db.session_scope() as session:
        world = _world(session)
    views = {p: get(client, f"/ops/accounts/{p}").json() for p in PEOPLE}

    response = get(client, f"/ops/districts/{DISTRICT}/preview")

    assert response.status_code == 200
    preview = response.json()
    with db.session_scope() as session:
        assert _world(session) == world
    assert {p: get(client, f"/ops/accounts/{p}").json() for p in PEOPLE} == views

    with db.session_scope() as session:
        outcome = exits.run_in_process(session, DISTRICT, trigger=TRIGGER)
    with db.session_scope() as session:
        removed = _world(session)["removed"]
    after = {p: get(client, f"/ops/accounts/{p}").json() for p in PEOPLE}

    assert preview["district"] == DISTRICT and preview["policy"] == {"admin_removal": policy}
    assert preview["accounts"] == len(outcome.converted) == 6
    assert preview["classes_removed"] == len(outcome.classes_removed) == removed["Class"] == 3
    assert preview["enrollments_removed"] == removed["Enrollment"]
    assert preview["teacher_links_removed"] == removed["ClassTeacher"]
    assert preview["goals_removed"] == removed["Goal"]
    assert preview["assignments_removed"] == removed["Assignment"]
    assert preview["report_grants_revoked"] == removed["ReportAccess"]
    # The exit stamps classes, not what hangs off them; grants go one by one with their admin.
    assert outcome.links_removed == removed["ReportAccess"]
    for item in preview["per_account"]:
        view = after[item["id"]]
        assert (view["kind"], view["status"]) == (item["kind_after"], item["status_after"])
        if item["status_after"] == "active":
            assert view["roles"] == item["roles_after"]
        assert not any(c["district_synced"] for c in view["classes"])
    for role, counts in preview["roles"].items():
        holders = [p for p, v in views.items() if v["district"] == DISTRICT and role in v["roles"]]
        assert counts["accounts"] == len(holders)
        assert counts["removed"] == sum(after[p]["status"] == "removed" for p in holders)
        assert counts["converted"] == sum(after[p]["status"] == "active" for p in holders)
    assert preview["roles"]["admin"]["removed"] == (1 if policy == "remove" else 0)


def test_exit_preview_of_unknown_district_is_404(seeded: TestClient) -> None:
    assert_error(get(seeded, "/ops/districts/5b2a6f0c8e9d7a00deadbeef/preview"), 404, "not_found")


def test_exit_request_with_the_broker_down_answers_a_json_503(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=TOKEN)
    seed()
    with TestClient(app, headers=AUTH, raise_server_exceptions=False) as client:
        response = client.post(f"/ops/districts/{DISTRICT}/exit")

    assert_error(response, 503)


# --------------------------------------------------------------------------------------------
# District exit progress


def _exit_through_units() -> int:
    """A district exit as the workers run it: planned, every unit run, finished."""
    with db.session_scope() as session:
        exit_id = exits.start_exit(session, DISTRICT, trigger=TRIGGER).exit_id
    with db.session_scope() as session:
        keys = session.scalars(select(ExitUnit.key).where(ExitUnit.exit_id == exit_id)).all()
    for key in keys:
        with db.session_scope() as session:
            exits.run_unit(session, exit_id, key)
    with db.session_scope() as session:
        exits.finish(session, exit_id)
    return exit_id


def test_exit_progress_says_restored_once_a_restore_has_undone_the_exit(
    seeded: TestClient,
) -> None:
    path = f"/ops/districts/{DISTRICT}/exit"
    assert_error(get(seeded, path), 404, "not_found")
    first = _exit_through_units()
    done = get(seeded, path).json()
    assert (done["exit"], done["status"]) == (first, "done")
    assert done["units_done"] == done["units_total"] > 0 and done["units_dead"] == 0

    with db.session_scope() as session:
        conversion.restore(session, DISTRICT, trigger=TRIGGER, retention_days=30)
    restored = get(seeded, path).json()
    # The same exit and its counts, no longer in force.
    assert restored == {**done, "status": "restored"}

    # Exited again: the new exit is the one reported, done.
    again = _exit_through_units()
    assert (get(seeded, path).json()["exit"], get(seeded, path).json()["status"]) == (
        again,
        "done",
    )
    assert again > first


# --------------------------------------------------------------------------------------------
# Pipeline status


def test_status_counts_pending_dead_and_held_events(inbox: TestClient) -> None:
    # The dead event's dead letter, and an exit unit's: `dead` counts every open dead letter.
    with db.session_scope() as session:
        for event_id, subject, task in (
            ("evt-d", "event:evt-d", "grassroots.process_event"),
            (None, "exit_unit:7:teacher:t1", "grassroots.exit_unit"),
        ):
            session.add(
                DeadLetter(event_id=event_id, subject=subject, task=task, reason="error", error="x")
            )
    response = get(inbox, "/ops/status")

    assert response.status_code == 200
    body = response.json()
    # Two accepted events are in flight; the broker is down, so no queue adds to that.
    assert (body["pending"], body["dead"], body["held"]) == (2, 2, 1)
    assert body["events_dead"] == 1
    assert body["queues"] == dict.fromkeys(QUEUES, 0)
    assert body["broker"].startswith("unavailable")


def test_status_counts_what_waits_however_old_and_final_events_of_the_last_day(
    client: TestClient,
) -> None:
    # Its cost follows what is open, not the inbox's history: final events count only while
    # received within the last 24 h.
    now = utcnow()
    with db.session_scope() as session:
        for event_id, status, age in (
            ("old-done", "done", timedelta(days=2)),
            ("old-dead", "dead", timedelta(days=40)),
            ("old-accepted", "accepted", timedelta(days=3)),
            ("new-done", "done", timedelta(hours=1)),
            ("new-ignored", "ignored", timedelta(hours=23)),
        ):
            at = now - age
            session.add(
                RosterEvent(
                    id=event_id,
                    type="users.updated",
                    payload={},
                    status=status,
                    received_at=at,
                    updated_at=at,
                )
            )

    body = get(client, "/ops/status").json()

    assert body["events"] == {"accepted": 1, "dead": 1, "done": 1, "ignored": 1}
    assert body["events_dead"] == 1 and body["pending"] == 1
    since = datetime.fromisoformat(body["events_final_since"])
    assert timedelta(hours=23, minutes=59) < now - since < timedelta(hours=24, minutes=1)


def test_status_reads_queue_depths_from_a_live_broker(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=LIVE_BROKER, OPS_TOKEN=TOKEN)
    with TestClient(app, headers=AUTH) as client:
        response = get(client, "/ops/status")

    assert response.status_code == 200
    body = response.json()
    assert body["broker"] == "ok"
    assert set(body["queues"]) == set(QUEUES)
    assert all(isinstance(depth, int) and depth >= 0 for depth in body["queues"].values())
    assert body["pending"] <= sum(body["queues"].values()) + body["unacked"]
    assert (body["dead"], body["held"]) == (0, 0)


def test_status_counts_tasks_in_flight_but_not_the_periodic_housekeeping(
    configure: Configure, database_url: str, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        configure(DATABASE_URL=database_url, BROKER_URL=redis.url, OPS_TOKEN=TOKEN)
        with TestClient(app, headers=AUTH) as client:
            assert get(client, "/ops/status").json()["pending"] == 0
            celery_app.send_task("grassroots.poll")  # routed to the maintenance queue
            celery_app.send_task("grassroots.purge")
            celery_app.send_task("grassroots.finish_exit", (1,))  # the fanout queue
            with celery_app.connection_for_write() as conn:
                channel: Any = conn.default_channel
                taken = channel.basic_get("maintenance", no_ack=False)  # a worker runs it
                assert taken is not None
                body = get(client, "/ops/status").json()
                assert body["queues"] == {**dict.fromkeys(QUEUES, 0), "maintenance": 1, "fanout": 1}
                assert body["unacked"] == 1
                assert body["pending"] == 1  # the exit's task, and nothing else

                fanout = channel.basic_get("fanout", no_ack=False)
                assert fanout is not None
                body = get(client, "/ops/status").json()
                assert (body["unacked"], body["pending"]) == (2, 1)
                fanout.ack()
                taken.ack()
            assert get(client, "/ops/status").json()["pending"] == 0
    finally:
        redis.stop()


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
