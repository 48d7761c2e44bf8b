"""A district exit as fan-out units: one unit per teacher (drop that teacher's district classes and
so the coaching through them), and batches of accounts to convert. The units and their count are
written in the same transaction that starts the exit, under deterministic keys, so the exit's
progress is known from the start and a redelivered parent never plans twice.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import psycopg
from sqlalchemy import JSON, String, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from models import DistrictExit, ExitUnit, JournalEntry, utcnow
from tasks import conversion
from tasks.errors import GrassrootsError, NotFound
from tasks.sql import ASYNC_COMMIT_PG, CHUNK, AsyncCommit, insert_rows

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
# only. ``unit_max_attempts``, if not NULL: it claims no unit started more often than that (see
# ``count_and_run_teacher_unit``). Its last column is ``tasks.sql.AsyncCommit``: the unit commits
# without the WAL wait.
_RUN_UNIT_PG = text(
    f"""
    WITH claimed AS (
        UPDATE exit_units SET status = 'done', finished_at = :unit_now
        WHERE exit_id = :unit_exit AND key = :unit_key AND status = 'pending'
            AND (kind = 'teacher' OR NOT :unit_alone)
            AND (CAST(:unit_max_attempts AS integer) IS NULL OR attempts <= :unit_max_attempts)
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
           {ASYNC_COMMIT_PG}
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
    if conn.dialect.name == "postgresql":
        row = conn.execute(
            _RUN_UNIT_PG, {**unit, "unit_alone": False, "unit_max_attempts": None}
        ).one_or_none()
        if row is None:
            return _not_claimed(conn, unit)
        if row.kind == "teacher":  # done and counted by the statement itself
            return _teacher_unit_result(row)
        kind, account_ids = row.kind, row.account_ids
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
    done, total, teachers = conn.execute(_COUNT_DONE, unit).one()
    return UnitResult(True, done >= total, outcome, kind == "teacher" and done == teachers)


def runs_alone(dialect: Dialect, key: str) -> bool:
    """Whether the unit is one statement that can run on an autocommit connection: a teacher
    unit on Postgres (``run_teacher_unit``, ``count_and_run_teacher_unit``)."""
    return dialect.name == "postgresql" and key.startswith(TEACHER_UNIT)


def _teacher_unit_params(conn: Connection, exit_id: int, key: str) -> dict[str, Any]:
    if not runs_alone(conn.dialect, key):
        raise GrassrootsError(f"unit {key} cannot run as one statement here")
    return {"unit_exit": exit_id, "unit_key": key, "unit_now": utcnow(), "unit_alone": True}


def _teacher_unit_result(row: Sequence[Any]) -> UnitResult:
    _, _, _, dropped, done, total, teachers, _ = row
    return UnitResult(
        True, done >= total, conversion.Outcome(classes_removed=list(dropped)), done == teachers
    )


def run_teacher_unit(conn: Connection, exit_id: int, key: str) -> UnitResult:
    """Postgres: run a teacher unit as one statement on an autocommit connection, where that
    statement is the whole transaction; no BEGIN, SET or COMMIT round trips around it."""
    unit = {**_teacher_unit_params(conn, exit_id, key), "unit_max_attempts": None}
    row = conn.execute(_RUN_UNIT_PG, unit).one_or_none()
    if row is None:
        return _not_claimed(conn, unit)
    return _teacher_unit_result(row)


class TeacherUnitFailed(Exception):
    """The attempt was counted (``attempts``), then the unit's statement failed (``error``, as
    SQLAlchemy would have raised it)."""

    def __init__(self, attempts: int, error: Exception) -> None:
        super().__init__(f"teacher unit failed on attempt {attempts}: {error}")
        self.attempts = attempts
        self.error = error


@functools.cache
def _driver_sql(dialect: Dialect) -> tuple[str, dict[str, Any], str]:
    """The counter's and the unit's statements as the driver takes them, with the counter's own
    constant parameters: compiled once, for a pipeline that bypasses SQLAlchemy's execution."""
    bump = BUMP_ATTEMPTS.compile(dialect=dialect)
    return bump.string, dict(bump.params), _RUN_UNIT_PG.compile(dialect=dialect).string


def count_and_run_teacher_unit(
    conn: Connection, exit_id: int, key: str, *, max_attempts: int
) -> tuple[int | None, UnitResult | None]:
    """Postgres, on an autocommit connection: count the attempt and run a teacher unit in one
    round trip (a psycopg pipeline), where counting and running cost one each.

    The count is a transaction of its own at the head of the pipeline (explicit BEGIN and COMMIT:
    a pipeline is otherwise one implicit transaction), so it is committed before the unit's
    statement starts, as every task's attempt count is. The unit's statement then claims the unit
    only if the count is within ``max_attempts``.

    Returns the count (None: the unit is no longer pending, nothing ran) and the unit's result
    (None if the count was past ``max_attempts``). Raises ``TeacherUnitFailed`` (with the count)
    if the unit's statement failed after the count committed; any other error (a
    ``DBAPIError``) leaves the count unknown.
    """
    unit = {**_teacher_unit_params(conn, exit_id, key), "unit_max_attempts": max_attempts}
    bump_sql, bump_constants, unit_sql = _driver_sql(conn.dialect)
    driver = conn.connection.driver_connection
    if not isinstance(driver, psycopg.Connection) or not driver.autocommit:
        raise GrassrootsError("counting and running a unit at once needs psycopg in autocommit")
    counted = None
    try:
        with driver.pipeline():
            driver.execute("BEGIN")
            counted = driver.execute(bump_sql, {**bump_constants, **unit})
            driver.execute("COMMIT")
            ran = driver.execute(unit_sql, unit)
    except psycopg.Error as exc:
        # What SQLAlchemy does with a driver error: a lost connection leaves the pool, and the
        # error is raised as SQLAlchemy's (which the task's retries classify).
        if conn.dialect.is_disconnect(cast(Any, exc), conn.connection, None):
            conn.invalidate(exc)
        error = DBAPIError.instance(
            unit_sql,
            unit,
            exc,
            psycopg.Error,
            connection_invalidated=conn.invalidated,
            dialect=conn.dialect,
        )
        row = counted.fetchone() if counted is not None and counted.pgresult else None
        if row is None:
            raise error from exc
        raise TeacherUnitFailed(row[0], error) from exc
    bumped = counted.fetchone()
    if bumped is None:
        return None, None
    row = ran.fetchone()
    if row is not None:
        return bumped[0], _teacher_unit_result(row)
    if bumped[0] > max_attempts:
        return bumped[0], None
    # Within the count but not claimed: another copy of the task has claimed the unit, or has
    # counted past the cap and dead-letters it.
    return bumped[0], UnitResult(False, False, conversion.Outcome())


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


RESTORED = "restored"  # a progress status only: the exit's row keeps its own status


def progress(session: Session, district_id: str) -> ExitProgress | None:
    """The district's latest exit, if any: ``restored`` once ``grassroots restore`` has undone
    it (its journal root, whose id is the exit's, is marked restored), else its own status."""
    found = session.execute(
        select(DistrictExit, JournalEntry.restored_at)
        .join(JournalEntry, JournalEntry.id == DistrictExit.id)
        .where(DistrictExit.district_id == district_id)
        .order_by(DistrictExit.id.desc())
        .limit(1)
    ).first()
    if found is None:
        return None
    row, restored_at = found
    return ExitProgress(
        row.id,
        row.district_id,
        RESTORED if restored_at is not None else row.status,
        row.units_done,
        row.units_total,
        row.accounts_total,
        row.started_at,
        row.finished_at,
    )
