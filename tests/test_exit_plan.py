"""An exit's units, planned in SQL on both backends: one unit per teacher with a live district
class, and every district account in exactly one batch, in id order, in batches of the size
asked for."""

from __future__ import annotations

import json

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Account, AccountKind, Class, ClassTeacher, DistrictExit, ExitUnit
from tasks import exits
from tasks.roster import load_snapshot
from tests.support.scenario import DISTRICT, example
from worker import dispatch
from worker.db import session_scope


def test_the_plan_holds_each_teacher_once_and_each_account_once_in_numbered_batches(
    session: Session,
) -> None:
    load_snapshot(session, example())
    accounts = sorted(
        session.scalars(
            select(Account.id).where(
                Account.district_id == DISTRICT, Account.kind == AccountKind.DISTRICT
            )
        )
    )
    teachers = set(
        session.scalars(
            select(ClassTeacher.teacher_id)
            .join(Class, Class.id == ClassTeacher.class_id)
            .where(Class.district_id == DISTRICT, ClassTeacher.removed_by.is_(None))
        )
    )
    assert len(accounts) > 2 and teachers

    plan = exits.start_exit(session, DISTRICT, trigger="test", batch_size=2)

    units = session.execute(
        select(ExitUnit.key, ExitUnit.kind, ExitUnit.account_ids, ExitUnit.status)
        .where(ExitUnit.exit_id == plan.exit_id)
        .order_by(ExitUnit.key)
    ).all()
    assert {u.status for u in units} == {"pending"}
    by_teacher = {u.key: u.account_ids for u in units if u.kind == "teacher"}
    assert by_teacher == {exits.TEACHER_UNIT + t: [t] for t in teachers}
    batches = [u for u in units if u.kind == "accounts"]
    assert [b.key for b in batches] == [
        f"{exits.ACCOUNTS_UNIT}{n:06d}" for n in range(len(batches))
    ]
    assert [b.account_ids for b in batches] == [
        accounts[first : first + 2] for first in range(0, len(accounts), 2)
    ]
    planned = session.get(DistrictExit, plan.exit_id)
    assert planned is not None
    assert (planned.teacher_units, planned.units_total, planned.accounts_total) == (
        len(teachers),
        len(units),
        len(accounts),
    )
    # Teacher units go first.
    assert {kind for _, kind in plan.pending} == {"teacher"}


def test_an_exit_started_again_plans_nothing_twice(session: Session) -> None:
    load_snapshot(session, example())
    first = exits.run_in_process(session, DISTRICT, trigger="test")
    assert first.converted
    restarted = exits.start_exit(session, DISTRICT, trigger="again")
    assert not restarted.created and restarted.pending == []


def test_units_just_planned_are_sent_as_planned_and_others_as_the_database_has_them(
    broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start sends the units it planned (stamped as sent in its own transaction) without
    reading them back; a start delivered again finds them planned and sends the pending rows."""
    with session_scope() as session:
        load_snapshot(session, example())
    with session_scope() as session:
        plan = exits.start_exit(session, DISTRICT, trigger="test")
    read: list[int] = []
    reading = exits.dispatch_pending

    def dispatch_pending(session: Session, exit_id: int) -> list[tuple[str, str]]:
        read.append(exit_id)
        return reading(session, exit_id)

    monkeypatch.setattr(dispatch, "dispatch_pending", dispatch_pending)

    def queued() -> list[str]:
        return [json.loads(m)["headers"]["argsrepr"] for m in broker.lrange("fanout", 0, -1)]

    assert plan.created
    dispatch.dispatch_started(plan)
    units = [repr((plan.exit_id, key)) for key, _ in plan.pending]
    assert units and sorted(queued()) == sorted(units)
    assert read == []

    with session_scope() as session:
        again = exits.start_exit(session, DISTRICT, trigger="test")
    assert not again.created
    dispatch.dispatch_started(again)
    assert read == [plan.exit_id]
    assert sorted(queued()) == sorted(units * 2)
