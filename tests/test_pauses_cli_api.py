"""Roster pauses and a district's own brake through their adapters (SPEC §5.5, §5.6): the command
line's pause, district policy and deferred-event commands, the ops API's pause routes and
metrics, and the migration that brings them, on a populated database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from models import District, EventStatus, Pause, utcnow
from tasks.roster import load_snapshot
from tests.support.app_env import CLOSED_BROKER, Configure, assert_error
from tests.support.pauses import pause, route, stored, user
from tests.support.scenario import DISTRICT, STEVE, example
from worker import db
from worker.api import app
from worker.cli import main
from worker.db import make_engine
from worker.migrate import downgrade, upgrade

OPS_TOKEN = "ops-token-for-the-pause-tests"


# --------------------------------------------------------------------------------------------
# The command line (SPEC §5.6): 0 success, 1 error, 2 misuse


@pytest.fixture
def cli(configure: Configure, database_url: str) -> CliRunner:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=OPS_TOKEN)
    with db.session_scope() as session:
        load_snapshot(session, example())
    return CliRunner()


def test_pause_add_list_and_remove_from_the_command_line(cli: CliRunner) -> None:
    added = cli.invoke(
        main,
        ["pause", "add", "--district", DISTRICT, "--until", "2099-01-05", "--reason", "holidays"],
    )
    assert added.exit_code == 0, added.output
    assert added.stdout.startswith("pause ") and "until 2099-01-05T00:00:00+00:00" in added.stdout
    everyone = cli.invoke(main, ["pause", "add", "--from", "2098-12-21", "--until", "2099-01-05"])
    assert everyone.exit_code == 0, everyone.output

    listed = cli.invoke(main, ["pause", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["district"], r["until"], r["reason"], r["deferred"]) for r in rows] == [
        (DISTRICT, "2099-01-05T00:00:00+00:00", "holidays", 0),
        (None, "2099-01-05T00:00:00+00:00", None, 0),
    ]
    assert datetime.fromisoformat(rows[0]["from"]) <= utcnow()  # --from defaults to now
    assert rows[1]["from"] == "2098-12-21T00:00:00+00:00"
    text_list = cli.invoke(main, ["pause", "list"])
    assert "every district from 2098-12-21" in text_list.stdout and "2 pause(s)" in text_list.stdout

    removed = cli.invoke(main, ["pause", "remove", str(rows[0]["id"])])
    assert removed.exit_code == 0, removed.output
    assert f"pause {rows[0]['id']} removed; 0 deferred event(s) released" in removed.stdout
    again = cli.invoke(main, ["pause", "remove", str(rows[0]["id"])])
    assert again.exit_code == 1 and f"no pause {rows[0]['id']}" in again.stderr
    assert [r["id"] for r in json.loads(cli.invoke(main, ["pause", "list", "--json"]).stdout)] == [
        rows[1]["id"]
    ]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--until", "soon"], 2, "--until 'soon' is not an ISO 8601 date or time"),
        (["--from", "2099-02-30", "--until", "2099-03-01"], 2, "--from '2099-02-30' is not"),
        (["--from", "2099-01-05", "--until", "2099-01-01"], 2, "before it starts"),
        (["--until", "2001-01-01"], 2, "before it starts"),
        ([], 2, "Missing option '--until'"),
        (["--district", "5b2a6f0c8e9d7a00deadbeef", "--until", "2099-01-01"], 1, "no district"),
    ],
    ids=["unparsable", "no-such-day", "ends-before-start", "ended", "no-until", "unknown-district"],
)
def test_pause_add_with_bad_input_fails_and_stores_nothing(
    cli: CliRunner, args: list[str], code: int, message: str
) -> None:
    result = cli.invoke(main, ["pause", "add", *args])
    assert result.exit_code == code, result.output
    assert message in result.stderr
    with db.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Pause)) == 0


def test_pause_remove_of_something_that_is_no_pause_id_is_misuse(cli: CliRunner) -> None:
    assert cli.invoke(main, ["pause", "remove", "winter"]).exit_code == 2


def test_district_policy_sets_and_clears_the_districts_own_brake(cli: CliRunner) -> None:
    shown = cli.invoke(main, ["district", "policy", DISTRICT, "--brake-percent", "2.5"])
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.strip() == f"district {DISTRICT}: admin_removal=convert, brake_percent=2.5"
    as_json = cli.invoke(main, ["district", "policy", DISTRICT, "--json"])
    assert json.loads(as_json.stdout)["policy"] == {
        "admin_removal": "convert",
        "brake_percent": 2.5,
    }
    cleared = cli.invoke(main, ["district", "policy", DISTRICT, "--brake-percent", "default"])
    assert "brake_percent=default (REMOVAL_BRAKE_PERCENT=10)" in cleared.stdout
    with db.session_scope() as session:
        district = session.get(District, DISTRICT)
        assert district is not None and district.brake_percent is None


@pytest.mark.parametrize("given", ["0", "101", "-3", "ten", "nan"])
def test_district_policy_refuses_a_brake_percent_out_of_range(cli: CliRunner, given: str) -> None:
    result = cli.invoke(main, ["district", "policy", DISTRICT, "--brake-percent", given])
    assert result.exit_code == 2, result.output
    assert "--brake-percent" in result.stderr
    with db.session_scope() as session:
        district = session.get(District, DISTRICT)
        assert district is not None and district.brake_percent is None


def test_deferred_events_are_listed_discarded_and_counted_from_the_command_line(
    cli: CliRunner,
) -> None:
    with db.session_scope() as session:
        pause(session)
        route(session, "cli-1", "users.deleted", user(STEVE, {"student": {}}))
    listed = cli.invoke(main, ["events", "list", "--status", "deferred", "--json"])
    assert [e["id"] for e in json.loads(listed.stdout)] == ["cli-1"]
    status = json.loads(cli.invoke(main, ["status", "--json"]).stdout)
    assert (status["deferred"], status["pending"]) == (1, 0)
    assert "deferred 1" in cli.invoke(main, ["status"]).stdout
    replayed = cli.invoke(main, ["events", "replay", "cli-1"])
    assert replayed.exit_code == 0
    assert "cli-1: deferred by a roster pause (applied when it ends)" in replayed.stdout

    discarded = cli.invoke(main, ["events", "discard", "cli-1"])
    assert discarded.exit_code == 0 and "cli-1: discarded (it was deferred)" in discarded.stdout
    again = cli.invoke(main, ["events", "discard", "cli-1"])
    assert again.exit_code == 1 and "only a held or a deferred event" in again.stderr


# --------------------------------------------------------------------------------------------
# The ops API (SPEC §5.5)

AUTH = {"Authorization": f"Bearer {OPS_TOKEN}"}


@pytest.fixture
def client(cli: CliRunner) -> Iterator[TestClient]:
    with TestClient(app, headers=AUTH) as test_client:
        yield test_client


def test_pauses_are_added_listed_and_removed_over_http(client: TestClient) -> None:
    made = client.post(
        "/ops/pauses",
        json={"district": None, "from": None, "until": "2099-01-05", "reason": "winter break"},
    )
    assert made.status_code == 201, made.text
    pause_ = made.json()
    assert set(pause_) == {"id", "district", "from", "until", "reason", "deferred"}
    assert (pause_["district"], pause_["until"], pause_["reason"]) == (
        None,
        "2099-01-05T00:00:00+00:00",
        "winter break",
    )
    assert datetime.fromisoformat(pause_["from"]) <= utcnow()
    one = client.post(
        "/ops/pauses",
        json={"district": DISTRICT, "from": "2098-06-15T00:00:00Z", "until": "2098-08-20"},
    )
    assert one.status_code == 201 and one.json()["reason"] is None
    assert [p["id"] for p in client.get("/ops/pauses").json()] == [pause_["id"], one.json()["id"]]

    with db.session_scope() as session:
        route(session, "http-1", "users.deleted", user(STEVE, {"student": {}}))
    assert client.get("/ops/pauses").json()[0]["deferred"] == 1
    removed = client.delete(f"/ops/pauses/{pause_['id']}")
    assert removed.status_code == 200
    assert removed.json() == {**pause_, "deferred": 1, "released": 1}
    with db.session_scope() as session:
        # Back in the inbox; the broker is down here, so it waits there for the relay.
        assert stored(session, "http-1").status == EventStatus.ACCEPTED
    assert [p["id"] for p in client.get("/ops/pauses").json()] == [one.json()["id"]]
    assert_error(client.delete(f"/ops/pauses/{pause_['id']}"), 404, "not_found")
    assert_error(client.delete("/ops/pauses/winter"), 404, "not_found")


@pytest.mark.parametrize(
    ("body", "status", "code", "message"),
    [
        (b"{not json", 400, "invalid_json", "not JSON"),
        (b"[]", 400, "invalid_json", "district"),
        (b'{"until": "2099-01-05"}', 422, "invalid_pause", "'district' is required"),
        (b'{"district": null}', 422, "invalid_pause", "'until' is required"),
        (b'{"district": 7, "until": "2099-01-05"}', 422, "invalid_pause", "'district'"),
        (b'{"district": null, "until": "soon"}', 422, "invalid_pause", "'until' 'soon' is not"),
        (b'{"district": null, "until": 20990105}', 422, "invalid_pause", "'until' is a string"),
        (
            b'{"district": null, "from": "2099-01-05", "until": "2099-01-01"}',
            422,
            "invalid_pause",
            "before it starts",
        ),
        (b'{"district": null, "until": "2001-01-01"}', 422, "invalid_pause", "before it starts"),
        (
            b'{"district": "5b2a6f0c8e9d7a00deadbeef", "until": "2099-01-05"}',
            404,
            "not_found",
            "no district 5b2a6f0c8e9d7a00deadbeef",
        ),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "no-district",
        "no-until",
        "district-not-text",
        "unparsable",
        "until-not-text",
        "ends-before-start",
        "ended",
        "unknown-district",
    ],
)
def test_a_bad_pause_request_is_answered_with_the_error_shape_and_stores_nothing(
    client: TestClient, body: bytes, status: int, code: str, message: str
) -> None:
    response = client.post(
        "/ops/pauses", content=body, headers={"content-type": "application/json"}
    )
    assert_error(response, status, code)
    assert message in response.json()["message"]
    assert client.get("/ops/pauses").json() == []


def test_a_deferred_event_is_discarded_over_http(client: TestClient) -> None:
    with db.session_scope() as session:
        pause(session)
        route(session, "http-2", "users.deleted", user(STEVE, {"student": {}}))
    response = client.post("/ops/events/http-2/discard")
    assert response.status_code == 200
    assert response.json() == {"event": "http-2", "status": "discarded", "was": "deferred"}
    assert_error(client.post("/ops/events/http-2/discard"), 409, "refused")
    assert_error(client.post("/ops/events/nope/discard"), 404, "not_found")
    assert client.get("/ops/status").json()["deferred"] == 0


def test_metrics_count_deferred_events(client: TestClient) -> None:
    with db.session_scope() as session:
        pause(session)
        route(session, "m-1", "users.deleted", user(STEVE, {"student": {}}))
    lines = client.get("/metrics").text.splitlines()
    assert "grassroots_deferred_events 1.0" in lines


# --------------------------------------------------------------------------------------------
# The migration


def test_the_migration_keeps_every_row_and_its_references_on_a_populated_database(
    database_url: str,
) -> None:
    # SQLite rebuilds a table to change its constraints: the rows that reference it (accounts of
    # a district, dead letters of an event) must survive the copy.
    downgrade(database_url, "0006")
    engine = make_engine(database_url)
    stamp = "2026-01-01 00:00:00+00:00"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO districts (id, name, status, admin_removal, created_at, updated_at)"
                " VALUES ('d1', 'D', 'active', 'convert', :t, :t)"
            ),
            {"t": stamp},
        )
        conn.execute(
            text(
                "INSERT INTO accounts (id, clever_id, is_admin, is_teacher, is_student, kind,"
                " status, district_id, created_at, updated_at) VALUES ('a1', 'a1', false, false,"
                " true, 'district', 'active', 'd1', :t, :t)"
            ),
            {"t": stamp},
        )
        conn.execute(
            text(
                "INSERT INTO roster_events (id, type, source, payload, status, attempts,"
                " brake_released, received_at, updated_at) VALUES ('e1', 'users.deleted',"
                " 'webhook', '{}', 'dead', 1, false, :t, :t)"
            ),
            {"t": stamp},
        )
        conn.execute(
            text(
                "INSERT INTO dead_letters (event_id, task, args, reason, error, attempts,"
                " first_failed_at, last_failed_at) VALUES ('e1', 't', '{}', 'r', 'e', 1, :t, :t)"
            ),
            {"t": stamp},
        )
    engine.dispose()
    upgrade(database_url)
    engine = make_engine(database_url)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT event_id FROM dead_letters")).scalars().all() == ["e1"]
        assert conn.execute(text("SELECT district_id FROM accounts")).scalars().all() == ["d1"]
        conn.execute(text("UPDATE roster_events SET status = 'deferred' WHERE id = 'e1'"))
    with engine.begin() as conn, pytest.raises(Exception, match=r"(?i)check"):
        conn.execute(text("UPDATE districts SET brake_percent = 0 WHERE id = 'd1'"))
    engine.dispose()
