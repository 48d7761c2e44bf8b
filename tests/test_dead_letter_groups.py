"""Dead letters grouped by task and error class (SPEC §5.9 "Dead letters", and on the ops API):
counts, first and last failure, the districts of dead exit units, and Replay all that sends
exactly the rows its confirmation saw."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import DeadLetter, District, DistrictExit, JournalEntry, RosterEvent, utcnow
from tasks import deadletters
from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.dead import EVENT_TASK, dead_event
from tests.support.stack import OPS_TOKEN
from worker import db
from worker.api import app

UNIT_TASK = "grassroots.exit_unit"


def dead_unit(session: Session, exit_id: int, key: str) -> None:
    session.add(
        DeadLetter(
            subject=f"exit_unit:{exit_id}:{key}",
            task=UNIT_TASK,
            reason="retries_exhausted",
            exception="OperationalError",
            error="lock timeout",
            attempts=8,
        )
    )
    session.flush()


def test_open_dead_letters_are_grouped_by_task_and_error_class(session: Session) -> None:
    dead_event(session, "e1", "KeyError", minutes_ago=30)
    dead_event(session, "e2", "KeyError", minutes_ago=10)
    dead_event(session, "e3", "ValueError", minutes_ago=5)
    resolved = dead_event(session, "e4", "KeyError", minutes_ago=1)
    resolved.resolved_at = utcnow()
    session.add(District(id="d1", name="D1"))
    root = JournalEntry(batch="b", kind="district", district_id="d1", rule="exit", trigger="t")
    session.add(root)
    session.flush()
    session.add(DistrictExit(id=root.id, district_id="d1", trigger="test", units_total=2))
    session.flush()
    dead_unit(session, root.id, "t1")
    dead_unit(session, root.id, "t2")

    found = deadletters.groups(session)

    assert [(g["task"], g["error"], g["count"], g["events"]) for g in found] == [
        (UNIT_TASK, "OperationalError", 2, 0),
        (EVENT_TASK, "KeyError", 2, 2),
        (EVENT_TASK, "ValueError", 1, 1),
    ]
    key_errors = found[1]
    assert key_errors["first_failed_at"] < key_errors["last_failed_at"]
    assert found[0]["districts"] == ["d1"]
    assert found[1]["districts"] == []


def test_replay_all_sends_only_what_the_confirmation_saw(session: Session) -> None:
    dead_event(session, "e1", "KeyError", minutes_ago=30)
    seen = dead_event(session, "e2", "KeyError", minutes_ago=10)
    dead_event(session, "e3", "ValueError", minutes_ago=5)
    # Dead after the confirmation was shown: a higher id.
    dead_event(session, "e9", "KeyError", minutes_ago=0)

    chosen = deadletters.group_events(session, task=EVENT_TASK, error="KeyError", up_to=seen.id)

    assert chosen == ["e1", "e2"]


@pytest.fixture
def api(configure: Configure, database_url: str) -> Iterator[TestClient]:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=OPS_TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as client:
        yield client


def test_the_groups_and_replay_all_are_on_the_ops_api(api: TestClient) -> None:
    with db.session_scope() as session:
        dead_event(session, "e1", "KeyError", minutes_ago=30)
        dead_event(session, "e2", "KeyError", minutes_ago=10)
    groups = api.get("/ops/dead-letters").json()
    assert [(g["task"], g["error"], g["count"]) for g in groups] == [(EVENT_TASK, "KeyError", 2)]
    with db.session_scope() as session:
        dead_event(session, "e3", "KeyError", minutes_ago=0)

    replayed = api.post(
        "/ops/dead-letters/replay",
        json={"task": EVENT_TASK, "error": "KeyError", "up_to": groups[0]["up_to"]},
    )

    assert replayed.status_code == 202, replayed.text
    assert sorted(replayed.json()["replayed"]) == ["e1", "e2"]
    with db.session_scope() as session:
        statuses = dict(session.execute(select(RosterEvent.id, RosterEvent.status)).tuples().all())
    # The broker is down: replayed events wait as accepted for the relay.
    assert statuses == {"e1": "accepted", "e2": "accepted", "e3": "dead"}
    assert [(g["count"]) for g in api.get("/ops/dead-letters").json()] == [1]
