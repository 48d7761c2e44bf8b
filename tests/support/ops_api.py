"""The ops API as its tests reach it (``tests/test_ops_api*.py``): the real app over HTTP
(TestClient) with its token, over a fresh database, seeded with the example district or with inbox
rows at known times. A pytest plugin (``tests/conftest.py``), for its fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from models import RosterEvent, utcnow
from tasks.inbox import ingest
from tasks.roster import load_snapshot
from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.scenario import DISTRICT, LEO, example
from tests.support.stack import OPS_TOKEN
from worker import db
from worker.api import app

TOKEN = OPS_TOKEN
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Nothing listens on port 1: connecting fails at once.
# The machine's Redis, on a database nothing else in the project uses.
LIVE_BROKER = "redis://127.0.0.1:6379/15"
TRIGGER = "test"


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
# Events in the inbox (the event routes and the pipeline status)


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
