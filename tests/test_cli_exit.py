"""``grassroots district exit ID --wait`` waits for the exit it started: not for an earlier exit of
the district that a restore has undone. In process, with the worker's part played by the pauses
of the command's wait."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from models import Account, DeadLetter, ExitUnit, OperatorRequest, RequestKind
from tasks import conversion, exits
from tasks.operator_requests import RequestLedger
from tasks.roster import load_snapshot
from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.scenario import DISTRICT, STEVE, example
from worker.celery_app import app as celery_app
from worker.cli import main
from worker.db import session_scope


def _start(district_id: str) -> int:
    with session_scope() as session:
        return exits.start_exit(session, district_id, trigger="test").exit_id


def _run_pending_units(exit_id: int) -> None:
    with session_scope() as session:
        keys = session.scalars(
            select(ExitUnit.key).where(ExitUnit.exit_id == exit_id, ExitUnit.status == "pending")
        ).all()
    for key in keys:
        with session_scope() as session:
            exits.run_unit(session, exit_id, key)
    with session_scope() as session:
        exits.finish(session, exit_id)


class Sending:
    """Celery's ``send_task`` played: records each district exit's arguments (the district and
    its request's id), and answers as Celery does."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, ...]] = []

    def __call__(self, name: str, args: tuple[Any, ...], task_id: str) -> SimpleNamespace:
        assert name == "grassroots.district_exit"
        self.sent.append(args)
        return SimpleNamespace(id=task_id)

    def districts(self) -> list[str]:
        return [args[0] for args in self.sent]


def _kind(account_id: str) -> str:
    with session_scope() as session:
        kind: str = session.scalars(select(Account.kind).where(Account.id == account_id)).one()
        return kind


@pytest.fixture
def restored_district(database_url: str, configure: Configure) -> int:
    """The example district, exited once and restored: its exit is on record as done."""
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    with session_scope() as session:
        load_snapshot(session, example())
    first = _start(DISTRICT)
    _run_pending_units(first)
    assert _kind(STEVE) == "grassroots"
    with session_scope() as session:
        conversion.restore(session, DISTRICT, trigger="test", retention_days=30)
    assert _kind(STEVE) == "district"
    return first


def test_exit_wait_follows_the_new_exit_not_the_one_a_restore_undid(
    restored_district: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    sending = Sending()
    started: list[int] = []

    def pause(seconds: float) -> None:
        # The worker's part, a step per pause: start the exit (so the command's first look finds
        # only the earlier one), then run its units.
        if not started:
            started.append(_start(sending.districts()[0]))
        else:
            _run_pending_units(started[0])

    monkeypatch.setattr(celery_app, "send_task", sending)
    monkeypatch.setattr(time, "sleep", pause)

    result = CliRunner().invoke(main, ["district", "exit", DISTRICT, "--wait"])

    assert result.exit_code == 0, result.output
    assert started and started[0] > restored_district
    with session_scope() as session:
        latest = exits.progress(session, DISTRICT)
    assert latest is not None and latest.exit_id == started[0] and latest.status == "done"
    assert _kind(STEVE) == "grassroots"
    assert f"district {DISTRICT} exited in" in result.output


def test_exit_wait_of_an_exited_district_ends_with_its_exit(
    restored_district: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Exited again and done: asking once more starts nothing new, and the wait ends at once.
    again = _start(DISTRICT)
    _run_pending_units(again)
    sending = Sending()
    monkeypatch.setattr(celery_app, "send_task", sending)

    def pause(seconds: float) -> None:
        raise AssertionError("the wait should have found the exit done")

    monkeypatch.setattr(time, "sleep", pause)

    result = CliRunner().invoke(main, ["district", "exit", DISTRICT, "--wait"])

    assert result.exit_code == 0, result.output
    ((district, request_id),) = sending.sent
    with session_scope() as session:
        asked = session.get(OperatorRequest, request_id)
        assert asked is not None
        assert (district, asked.kind, asked.district_id, asked.by) == (
            DISTRICT,
            "exit",
            DISTRICT,
            "cli:district-exit",
        )
    assert f"district {DISTRICT} exited in" in result.output


def test_exit_wait_ends_with_an_error_when_a_restore_undoes_the_exit_it_waits_for(
    restored_district: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    sending = Sending()
    started: list[int] = []
    monkeypatch.setattr(celery_app, "send_task", sending)

    def pause(seconds: float) -> None:
        # The worker starts the exit and runs it; an operator restores the district before the
        # command looks again. A third pause would be a wait that never ends.
        if not started:
            started.append(_start(sending.districts()[0]))
            return
        assert len(started) == 1, "the wait went on after the restore"
        started.append(started[0])
        _run_pending_units(started[0])
        with session_scope() as session:
            conversion.restore(session, DISTRICT, trigger="test", retention_days=30)

    monkeypatch.setattr(time, "sleep", pause)

    result = CliRunner().invoke(main, ["district", "exit", DISTRICT, "--wait"])

    assert result.exit_code == 1, result.output
    assert f"district {DISTRICT}: exit {started[0]} was undone by a restore" in result.output
    assert _kind(STEVE) == "district"


def test_exit_wait_ends_with_status_1_when_the_exits_start_is_dead_lettered(
    restored_district: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    sending = Sending()
    looks: list[float] = []
    monkeypatch.setattr(celery_app, "send_task", sending)

    def pause(seconds: float) -> None:
        # The worker gives up on the start task, and marks its request dead (as its ledger
        # does with the dead letter); a second pause would be a wait that never ends.
        assert not looks, "the wait went on after the start was dead-lettered"
        looks.append(seconds)
        ((_, request_id),) = sending.sent
        with session_scope() as session:
            assert RequestLedger(RequestKind.EXIT, DISTRICT, request_id).mark_dead(
                session, "started 3 times without finishing"
            )

    monkeypatch.setattr(time, "sleep", pause)

    result = CliRunner().invoke(main, ["district", "exit", DISTRICT, "--wait"])

    assert result.exit_code == 1
    assert f"district {DISTRICT}: the exit's start failed for good" in result.stderr


def test_exit_wait_and_resume_of_a_stalled_exit_in_process(
    restored_district: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead unit: the wait ends with status 1 naming it; resume makes it pending again with a
    fresh budget and closes its dead letter, and the exit then finishes."""
    exit_id = _start(DISTRICT)
    with session_scope() as session:
        unit = session.scalars(
            select(ExitUnit).where(ExitUnit.exit_id == exit_id).order_by(ExitUnit.key).limit(1)
        ).one()
        key = unit.key
        unit.status, unit.attempts = "dead", 9
        session.add(
            DeadLetter(
                task="grassroots.exit_unit",
                subject=f"exit_unit:{exit_id}:{key}",
                reason="retries_exhausted",
                error="lock timeout",
            )
        )
    monkeypatch.setattr(celery_app, "send_task", Sending())
    monkeypatch.setattr(time, "sleep", lambda seconds: None)

    waited = CliRunner().invoke(main, ["district", "exit", DISTRICT, "--wait"])
    assert waited.exit_code == 1
    assert f"exit {exit_id} is stalled: dead unit(s) {key}" in waited.stderr

    sent: list[int] = []
    monkeypatch.setattr("worker.dispatch.dispatch_exit", sent.append)
    resumed = CliRunner().invoke(main, ["district", "resume", DISTRICT])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout == f"district {DISTRICT}: exit {exit_id} resumed ({key})\n"
    assert sent == [exit_id]
    with session_scope() as session:
        again = session.get(ExitUnit, (exit_id, key))
        assert again is not None and (again.status, again.attempts) == ("pending", 0)
        letter = session.scalars(select(DeadLetter)).one()
        assert letter.resolved_at is not None
    _run_pending_units(exit_id)
    with session_scope() as session:
        done = exits.progress(session, DISTRICT)
    assert done is not None and (done.status, done.units_dead) == ("done", [])
