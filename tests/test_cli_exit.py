"""``grassroots district exit ID --wait`` waits for the exit it started: not for an earlier exit of
the district that a restore has undone. In process, with the worker's part played by the pauses
of the command's wait."""

from __future__ import annotations

import time
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from models import Account, ExitUnit
from tasks import conversion, exits
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
    sent: list[str] = []
    started: list[int] = []

    def send_task(name: str, args: tuple[Any, ...]) -> None:
        assert name == "grassroots.district_exit"
        sent.append(args[0])

    def pause(seconds: float) -> None:
        # The worker's part, a step per pause: start the exit (so the command's first look finds
        # only the earlier one), then run its units.
        if not started:
            started.append(_start(sent[0]))
        else:
            _run_pending_units(started[0])

    monkeypatch.setattr(celery_app, "send_task", send_task)
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
    sent: list[tuple[Any, ...]] = []
    monkeypatch.setattr(celery_app, "send_task", lambda name, args: sent.append(args))

    def pause(seconds: float) -> None:
        raise AssertionError("the wait should have found the exit done")

    monkeypatch.setattr(time, "sleep", pause)

    result = CliRunner().invoke(main, ["district", "exit", DISTRICT, "--wait"])

    assert result.exit_code == 0, result.output
    assert sent == [(DISTRICT, "cli:district-exit")]
    assert f"district {DISTRICT} exited in" in result.output


def test_exit_wait_ends_with_an_error_when_a_restore_undoes_the_exit_it_waits_for(
    restored_district: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []
    started: list[int] = []
    monkeypatch.setattr(celery_app, "send_task", lambda name, args: sent.append(args[0]))

    def pause(seconds: float) -> None:
        # The worker starts the exit and runs it; an operator restores the district before the
        # command looks again. A third pause would be a wait that never ends.
        if not started:
            started.append(_start(sent[0]))
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
