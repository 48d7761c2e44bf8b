"""Retention (``tasks.retention``): past ``RETENTION_DAYS`` the purge strips the personal data the
pipeline kept along the way (raw Clever payloads, resolved dead letters, audit details) and keeps
what an operator still needs: every row's ids and statuses, and whatever waits for an operator."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import (
    AuditRecord,
    DeadLetter,
    EventStatus,
    OperatorRequest,
    RequestKind,
    RequestStatus,
    RosterEvent,
    TaskAttempt,
    utcnow,
)
from tasks import retention
from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.cli import grassroots
from worker.cli import main
from worker.db import session_scope
from worker.settings import load_settings

OLD = timedelta(days=45)
RECENT = timedelta(days=2)
PERSONAL = {"name": {"first": "Leo", "last": "Park"}, "email": "leo@example.org"}


def _event(session: Session, event_id: str, status: EventStatus, age: timedelta) -> None:
    at = utcnow() - age
    session.add(
        RosterEvent(
            id=event_id,
            type="users.updated",
            object_type="user",
            object_id="u-" + event_id,
            payload={"id": event_id, "data": {"object": {"id": "u-" + event_id, **PERSONAL}}},
            status=status,
            error="why" if status == EventStatus.REJECTED else None,
            received_at=at,
            updated_at=at,
        )
    )


def _letter(session: Session, subject: str, *, resolved: datetime | None) -> None:
    session.add(
        DeadLetter(
            subject=subject,
            task="grassroots.exit_unit",
            args={"args": [1, "teacher:t1"]},
            reason="error",
            exception="OperationalError",
            error="lock timeout",
            traceback="Traceback ...",
            resolved_at=resolved,
        )
    )


def _audit(session: Session, subject: str, age: timedelta) -> None:
    session.add(
        AuditRecord(
            at=utcnow() - age,
            action="convert",
            trigger="event:e1",
            subject_type="account",
            subject_id=subject,
            details={"rule": "teacher_left"},
        )
    )


def _filled(session: Session) -> None:
    _event(session, "done-old", EventStatus.DONE, OLD)
    _event(session, "rejected-old", EventStatus.REJECTED, OLD)
    _event(session, "done-recent", EventStatus.DONE, RECENT)
    # Waiting for an operator: a replay needs its payload, however old.
    _event(session, "dead-old", EventStatus.DEAD, OLD)
    _event(session, "held-old", EventStatus.HELD, OLD)
    _letter(session, "resolved-old", resolved=utcnow() - OLD)
    _letter(session, "resolved-recent", resolved=utcnow() - RECENT)
    _letter(session, "open", resolved=None)
    _audit(session, "a-old", OLD)
    _audit(session, "a-recent", RECENT)
    session.add(
        TaskAttempt(
            task_id="t-old",
            task="grassroots.finish_exit",
            attempts=1,
            first_at=utcnow() - OLD,
            last_at=utcnow() - OLD,
        )
    )
    session.add(
        TaskAttempt(
            task_id="t-new",
            task="grassroots.finish_exit",
            attempts=1,
            first_at=utcnow(),
            last_at=utcnow(),
        )
    )
    for request_id, status, finished in (
        ("r-old", RequestStatus.DONE, utcnow() - OLD),
        ("r-recent", RequestStatus.DONE, utcnow() - RECENT),
        # Still to be taken by a worker: the relay sends it, however old.
        ("r-open", RequestStatus.ASKED, None),
    ):
        session.add(
            OperatorRequest(
                id=request_id,
                kind=RequestKind.EXIT,
                district_id="d1",
                by="test",
                task_id=request_id,
                status=status,
                created_at=utcnow() - OLD,
                finished_at=finished,
            )
        )
    session.flush()


def _events(session: Session) -> dict[str, tuple[str, dict[str, Any], str | None]]:
    session.expire_all()
    return {e.id: (e.status, e.payload, e.error) for e in session.scalars(select(RosterEvent))}


def test_purge_strips_final_events_old_letters_and_audit_details_and_keeps_the_rest(
    session: Session,
) -> None:
    _filled(session)
    before = _events(session)
    old_times = {e.id: e.updated_at for e in session.scalars(select(RosterEvent))}

    purged = retention.purge(session, retention_days=30)

    assert purged.as_dict() == {
        "journal_entries": 0,
        "event_payloads": 2,
        "dead_letters": 1,
        "audit_details": 1,
        "task_attempts": 1,
        "operator_requests": 1,
    }
    events = _events(session)
    assert events["done-old"] == (EventStatus.DONE, {}, None)
    assert events["rejected-old"] == (EventStatus.REJECTED, {}, None)
    for kept in ("done-recent", "dead-old", "held-old"):
        assert events[kept] == before[kept]
    # When each became final stays on record.
    assert {e.id: e.updated_at for e in session.scalars(select(RosterEvent))} == old_times
    assert sorted(map(str, session.scalars(select(DeadLetter.subject)))) == [
        "open",
        "resolved-recent",
    ]
    audit = session.execute(select(AuditRecord.subject_id, AuditRecord.details))
    assert {subject: details for subject, details in audit} == {
        "a-old": {},
        "a-recent": {"rule": "teacher_left"},
    }
    assert list(session.scalars(select(TaskAttempt.task_id))) == ["t-new"]
    assert sorted(session.scalars(select(OperatorRequest.id))) == ["r-open", "r-recent"]

    # Nothing is left to strip: a second purge changes nothing.
    assert set(retention.purge(session, retention_days=30).as_dict().values()) == {0}


def test_grassroots_purge_prints_what_it_purged(database_url: str, configure: Configure) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, RETENTION_DAYS="30")
    with session_scope() as session:
        _filled(session)
    runner = CliRunner()

    result = runner.invoke(main, ["purge", "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["event_payloads"] == 2
    again = runner.invoke(main, ["purge"])
    assert again.exit_code == 0, again.output
    assert again.output == (
        "purged 0 journal entries, 0 event payloads, 0 dead letters, 0 audit details,"
        " 0 task attempts, 0 operator requests\n"
    )
    with session_scope() as session:
        row = session.get(RosterEvent, "done-old")
        assert row is not None and "leo@example.org" not in json.dumps(row.payload)


@pytest.mark.parametrize("days", ["0", "-3"])
def test_a_retention_of_no_days_is_refused_before_anything_starts(
    tmp_path: Path, days: str
) -> None:
    # 0 would purge what a conversion removed at the next run: nothing left to restore.
    for command in (["purge"], ["serve"]):
        result = grassroots(tmp_path, *command, RETENTION_DAYS=days)

        assert result.returncode == 1
        assert result.stderr == (
            "grassroots: RETENTION_DAYS: must be at least 1 (days a conversion stays restorable"
            f" before the purge), got {days!r}\n"
        )


def test_a_retention_of_one_day_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETENTION_DAYS", "1")

    assert load_settings().retention_days == 1
