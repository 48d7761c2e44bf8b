"""A failure is recorded even when writing its dead letter first meets a transient error (a row
lock held a moment by another copy of the same task times out): the short retries ride it out."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from models import DeadLetter, RosterEvent
from tasks.attempts import EventLedger
from tasks.inbox import ingest
from tests.support.app_env import CLOSED_BROKER, Configure
from worker import db, tasking
from worker.db import session_scope
from worker.jobs import process_event


def test_a_dead_letter_is_written_after_a_transient_failure_to_write_it(
    configure: Configure, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    event = {
        "id": "evt-1",
        "type": "users.deleted",
        "created": "2026-11-01T00:00:00Z",
        "data": {"object": {"id": "u1"}},
    }
    with session_scope() as session:
        ingest(session, event, source="webhook")
    real_scope = db.session_scope
    tries: list[int] = []

    def lock_timeout_first() -> Any:
        tries.append(1)
        if len(tries) == 1:
            raise OperationalError("UPDATE roster_events", {}, Exception("lock timeout"))
        return real_scope()

    monkeypatch.setattr(tasking, "session_scope", lock_timeout_first)

    process_event._dead_letter(
        EventLedger("evt-1"), ("evt-1",), {}, RuntimeError("it broke"), "error", 1
    )

    assert len(tries) == 2
    with session_scope() as session:
        letter = session.scalars(select(DeadLetter)).one()
        assert (letter.event_id, letter.reason, letter.error) == ("evt-1", "error", "it broke")
        assert "RuntimeError: it broke" in (letter.traceback or "")
        assert session.scalar(select(RosterEvent.status)) == "dead"
