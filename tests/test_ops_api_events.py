"""The ops API's event routes, SPEC §5.5: listing and detail of the stored events, and replay,
which changes nothing for an applied event and sends a dead one round again, once.
"""

from __future__ import annotations

import concurrent.futures

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import AuditRecord, RosterEvent
from tasks import events
from tests.support.app_env import assert_error
from tests.support.ops_api import get, put_event
from tests.support.scenario import DISTRICT, LEO
from worker import db


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
