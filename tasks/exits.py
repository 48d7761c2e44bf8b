"""A district exit as fan-out units: one unit per teacher (drop that teacher's district classes and
so the coaching through them), and batches of accounts to convert. The units and their count are
written in the same transaction that starts the exit, under deterministic keys, so the exit's
progress is known from the start and a redelivered parent never plans twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from models import DistrictExit, ExitUnit, utcnow
from tasks import conversion
from tasks.errors import GrassrootsError, NotFound
from tasks.sql import CHUNK, AsyncCommit, insert_rows

TEACHER_UNIT = "teacher:"  # a teacher unit's key: this, then the teacher's account id


@dataclass(frozen=True)
class ExitPlan:
    exit_id: int
    district_id: str
    pending: list[tuple[str, str]]  # (key, kind) of units still to run
    created: bool


def start_exit(
    session: Session, district_id: str, *, trigger: str, batch_size: int = CHUNK
) -> ExitPlan:
    """Begin (or find) the district's exit and its units."""
    start = conversion.begin_district_exit(session, district_id, trigger=trigger)
    existing = session.get(DistrictExit, start.root_id, with_for_update=True)
    if existing is None:
        teachers = conversion.exit_teacher_ids(session, district_id)
        accounts = conversion.exit_account_ids(session, district_id)
        units: list[dict[str, Any]] = [
            {
                "exit_id": start.root_id,
                "key": TEACHER_UNIT + t,
                "kind": "teacher",
                "account_ids": [t],
            }
            for t in teachers
        ]
        for n, first in enumerate(range(0, len(accounts), batch_size)):
            units.append(
                {
                    "exit_id": start.root_id,
                    "key": f"accounts:{n:06d}",
                    "kind": "accounts",
                    "account_ids": accounts[first : first + batch_size],
                }
            )
        session.add(
            DistrictExit(
                id=start.root_id,
                district_id=district_id,
                trigger=trigger,
                units_total=len(units),
                teacher_units=len(teachers),
                accounts_total=len(accounts),
            )
        )
        session.flush()
        now = utcnow()
        insert_rows(
            session,
            ExitUnit,
            [{**u, "status": "pending", "attempts": 0, "dispatched_at": now} for u in units],
        )
    return ExitPlan(
        exit_id=start.root_id,
        district_id=district_id,
        pending=pending_units(session, start.root_id),
        created=existing is None,
    )


def pending_units(session: Session, exit_id: int) -> list[tuple[str, str]]:
    """Units still to run, in their phase: every teacher's classes first, then the account
    batches. A batch run beside the teacher units would detach teachers one account at a time
    and contend with them for the same class locks; after them it only converts accounts."""
    units = [
        (key, kind)
        for key, kind in session.execute(
            select(ExitUnit.key, ExitUnit.kind)
            .where(ExitUnit.exit_id == exit_id, ExitUnit.status == "pending")
            .order_by(ExitUnit.key)
        )
    ]
    teachers = [u for u in units if u[1] == "teacher"]
    return teachers or units


@dataclass(frozen=True)
class UnitResult:
    ran: bool  # False: the unit was already done (a redelivery)
    exit_complete: bool  # every unit is done: the finish step may run
    outcome: conversion.Outcome
    teachers_complete: bool = False  # the last teacher unit: the account batches may start


# The statements every unit runs, built once: thousands of units each building them afresh spent
# more time in SQLAlchemy's statement construction than in the database.
_this_unit = (
    ExitUnit.exit_id == bindparam("unit_exit"),
    ExitUnit.key == bindparam("unit_key"),
)
# Marking the unit done is what locks it: a redelivered copy waits, then finds it done.
_CLAIM = (
    update(ExitUnit)
    .where(*_this_unit, ExitUnit.status == "pending")
    .values(status="done", finished_at=bindparam("unit_now"))
    .returning(
        ExitUnit.kind,
        ExitUnit.account_ids,
        select(DistrictExit.district_id)
        .where(DistrictExit.id == ExitUnit.exit_id)
        .scalar_subquery(),
    )
)
_STATUS = select(ExitUnit.status).where(*_this_unit)
# The counter row serialises concurrent units, so exactly one of them sees the last unit done,
# and exactly one the last teacher unit (no account batch runs before that one).
_COUNT_DONE = (
    update(DistrictExit)
    .where(DistrictExit.id == bindparam("unit_exit"))
    .values(units_done=DistrictExit.units_done + 1, progressed_at=bindparam("unit_now"))
    .returning(DistrictExit.units_done, DistrictExit.units_total, DistrictExit.teacher_units)
)
BUMP_ATTEMPTS = (
    update(ExitUnit)
    .where(*_this_unit, ExitUnit.status == "pending")
    .values(attempts=ExitUnit.attempts + 1)
    .returning(ExitUnit.attempts, AsyncCommit())
)


# Postgres does a teacher unit in one statement: claim the unit, lock and drop the teacher's
# classes, count the unit done. The same steps as ``run_unit`` takes one statement at a time, in
# one round trip instead of four; a district has thousands of these units. An account batch is
# claimed by the same statement; its conversion and then its count follow in the transaction.
# ``unit_alone``: the statement is its own transaction (autocommit), so it claims a teacher unit
# only. Its last column is ``tasks.sql.AsyncCommit``: the unit commits without the WAL wait.
_RUN_UNIT_PG = text(
    """
    WITH claimed AS (
        UPDATE exit_units SET status = 'done', finished_at = :unit_now
        WHERE exit_id = :unit_exit AND key = :unit_key AND status = 'pending'
            AND (kind = 'teacher' OR NOT :unit_alone)
        RETURNING kind, account_ids
    ), locked AS (
        SELECT classes.id FROM classes
        JOIN class_teachers ON class_teachers.class_id = classes.id
        WHERE class_teachers.teacher_id = (
                SELECT account_ids ->> 0 FROM claimed WHERE kind = 'teacher'
            )
            AND class_teachers.removed_by IS NULL
            AND classes.district_id = (
                SELECT district_id FROM district_exits WHERE id = :unit_exit
            )
            AND classes.removed_by IS NULL
        ORDER BY classes.id
        FOR UPDATE OF classes
    ), dropped AS (
        UPDATE classes SET removed_by = :unit_exit, updated_at = :unit_now
        WHERE id IN (SELECT id FROM locked) AND removed_by IS NULL
        RETURNING id
    ), counted AS (
        UPDATE district_exits
        SET units_done = units_done + 1, progressed_at = :unit_now
        WHERE id = :unit_exit AND EXISTS (SELECT FROM claimed WHERE kind = 'teacher')
        RETURNING units_done, units_total, teacher_units
    )
    SELECT claimed.kind, claimed.account_ids,
           (SELECT district_id FROM district_exits WHERE id = :unit_exit) AS district_id,
           ARRAY(SELECT id FROM dropped ORDER BY id) AS dropped,
           counted.units_done, counted.units_total, counted.teacher_units,
           set_config('synchronous_commit', 'off', true)
    FROM claimed LEFT JOIN counted ON true
    """
).columns(account_ids=JSON(), dropped=ARRAY(String()))


def run_unit(session: Session, exit_id: int, key: str, *, trigger: str) -> UnitResult:
    """Run one unit exactly once: its work, its ``done`` mark and the exit's count commit
    together. A failure rolls the mark back.

    The count comes last: the counter row is every unit's, and its lock is held to the commit.
    """
    conn = session.connection()
    unit = {"unit_exit": exit_id, "unit_key": key, "unit_now": utcnow()}
    counted = None
    if conn.dialect.name == "postgresql":
        row = conn.execute(_RUN_UNIT_PG, {**unit, "unit_alone": False}).one_or_none()
        if row is None:
            return _not_claimed(conn, unit)
        kind, account_ids, district_id, dropped, *count, _ = row
        outcome = conversion.Outcome(classes_removed=list(dropped))
        counted = count if kind == "teacher" else None
    else:
        claimed = conn.execute(_CLAIM, unit).one_or_none()
        if claimed is None:
            return _not_claimed(conn, unit)
        kind, account_ids, district_id = claimed
        if kind == "teacher":
            outcome = conversion.exit_teacher_unit(
                session, district_id, account_ids[0], root_id=exit_id, trigger=trigger
            )
    if kind == "accounts":
        outcome = conversion.exit_account_batch(
            session, account_ids, root_id=exit_id, trigger=trigger
        )
    done, total, teachers = counted or conn.execute(_COUNT_DONE, unit).one()
    return UnitResult(True, done >= total, outcome, kind == "teacher" and done == teachers)


def run_teacher_unit(conn: Connection, exit_id: int, key: str) -> UnitResult:
    """Postgres: run a teacher unit as one statement on an autocommit connection, where that
    statement is the whole transaction; no BEGIN, SET or COMMIT round trips around it."""
    if conn.dialect.name != "postgresql" or not key.startswith(TEACHER_UNIT):
        raise GrassrootsError(f"unit {key} cannot run as one statement here")
    unit = {"unit_exit": exit_id, "unit_key": key, "unit_now": utcnow(), "unit_alone": True}
    row = conn.execute(_RUN_UNIT_PG, unit).one_or_none()
    if row is None:
        return _not_claimed(conn, unit)
    _, _, _, dropped, done, total, teachers, _ = row
    outcome = conversion.Outcome(classes_removed=list(dropped))
    return UnitResult(True, done >= total, outcome, done == teachers)


def _not_claimed(conn: Connection, unit: dict[str, Any]) -> UnitResult:
    status = conn.scalar(_STATUS, unit)
    if status == "pending":  # only an account batch is not claimed while pending
        raise GrassrootsError(f"unit {unit['unit_key']} needs a transaction of its own")
    if status:
        return UnitResult(False, False, conversion.Outcome())  # done (or dead) already
    raise NotFound(f"no unit {unit['unit_key']} in exit {unit['unit_exit']}")


def finish(session: Session, exit_id: int, *, trigger: str) -> conversion.Outcome | None:
    """The last step: remove what no unit reached. None if the exit was already finished or still
    has pending units."""
    district_exit = session.get(DistrictExit, exit_id, with_for_update=True)
    if district_exit is None:
        raise NotFound(f"no exit {exit_id}")
    if district_exit.status == "done" or district_exit.units_done < district_exit.units_total:
        return None
    outcome = conversion.finish_district_exit(
        session, district_exit.district_id, root_id=exit_id, trigger=trigger
    )
    district_exit.status = "done"
    district_exit.finished_at = utcnow()
    return outcome


@dataclass(frozen=True)
class ExitProgress:
    exit_id: int
    district_id: str
    status: str
    done: int
    total: int
    accounts: int
    started_at: datetime
    finished_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "exit": self.exit_id,
            "district": self.district_id,
            "status": self.status,
            "done": self.done,
            "total": self.total,
            "accounts": self.accounts,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


def progress(session: Session, district_id: str) -> ExitProgress | None:
    """The district's latest exit, if any."""
    row = session.scalar(
        select(DistrictExit)
        .where(DistrictExit.district_id == district_id)
        .order_by(DistrictExit.id.desc())
        .limit(1)
    )
    if row is None:
        return None
    return ExitProgress(
        row.id,
        row.district_id,
        row.status,
        row.units_done,
        row.units_total,
        row.accounts_total,
        row.started_at,
        row.finished_at,
    )
