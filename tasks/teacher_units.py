"""A teacher unit of a district exit, counted and run on Postgres in two statements.

A district has thousands of teacher units, each a Celery task whose time in the pool process
holds up the next (bench/README.md). ``count_and_run_teacher_unit`` counts the attempt, then runs
the unit (``tasks.exits.run_unit``'s claim, class drop and count, built from the same statements)
as one statement of data-modifying CTEs: two round trips, each its own transaction, on the
driver's connection without SQLAlchemy's per-statement work.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import cast as type_cast

import psycopg
from sqlalchemy import and_, exists, func, select
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import Select

from models import UnitKind
from tasks.attempts import BUMP_UNIT
from tasks.conversion import Outcome
from tasks.errors import GrassrootsError
from tasks.exits import (
    CLAIM,
    TEACHER_UNIT,
    UnitResult,
    count_done,
    counted,
    drop_teacher_classes,
    run_params,
)


def _teacher_unit() -> Select[tuple[int, int, int, list[str] | None]]:
    """Postgres: the claim, the drop and the count of a teacher unit as one statement, in that
    order (its own transaction in autocommit). The steps after the claim act only if it claimed
    (they cannot see its row: a statement's sub-statements share one snapshot). The count waits
    for the drop (its condition reads the drop's rows, a one-time filter evaluated before the
    counter row is locked), so the locks are taken as ``run_unit`` takes them: the unit, the
    classes, the counter. No row: the unit was not claimed."""
    claimed = CLAIM.cte("claimed")
    ran = exists(select(claimed.c.kind))
    dropped = drop_teacher_classes(ran).cte("dropped")
    after_drop = select(func.count()).select_from(dropped).scalar_subquery() >= 0
    progress = count_done(and_(ran, after_drop)).cte("counted")
    return select(
        progress.c.units_done,
        progress.c.units_total,
        progress.c.teacher_units,
        select(func.array_agg(dropped.c.id)).scalar_subquery(),
    )


def can_count_and_run(dialect: Dialect, key: str) -> bool:
    """Whether ``count_and_run_teacher_unit`` can run the unit: a teacher unit, on Postgres."""
    return dialect.name == "postgresql" and key.startswith(TEACHER_UNIT)


class TeacherUnitFailed(Exception):
    """The attempt was counted (``attempts``), then the unit failed (``error``, as SQLAlchemy
    would have raised it)."""

    def __init__(self, attempts: int, error: Exception) -> None:
        super().__init__(f"teacher unit failed on attempt {attempts}: {error}")
        self.attempts = attempts
        self.error = error


@functools.cache
def _driver_sql(dialect: Dialect) -> list[tuple[str, dict[str, Any]]]:
    """The counter's and the unit's statements as the driver takes them, each with its own
    constant parameters: compiled once, run without SQLAlchemy's per-statement work."""
    compiled = []
    for statement in (BUMP_UNIT, _teacher_unit()):
        sql = statement.compile(dialect=dialect)
        compiled.append((sql.string, {k: v for k, v in sql.params.items() if v is not None}))
    return compiled


def count_and_run_teacher_unit(
    conn: Connection, exit_id: int, key: str, *, max_attempts: int
) -> tuple[int | None, UnitResult | None]:
    """Postgres, on an autocommit connection: count the attempt, then run a teacher unit (what
    ``run_unit`` does) as one statement. Two statements in all, each its own transaction: the
    count commits before the unit starts, as every task's attempt count does, and the unit is
    claimed only if the count is within ``max_attempts``.

    Returns the count (None: the unit is no longer pending, nothing ran) and the unit's result
    (None if the count was past ``max_attempts``). Raises ``TeacherUnitFailed`` (with the count)
    if the unit failed after the count committed; any other error (a ``DBAPIError``) leaves the
    count unknown.
    """
    if not can_count_and_run(conn.dialect, key):
        raise GrassrootsError(f"unit {key} cannot be counted and run at once here")
    driver = conn.connection.driver_connection
    if not isinstance(driver, psycopg.Connection) or not driver.autocommit:
        raise GrassrootsError("counting and running a unit at once needs psycopg in autocommit")
    unit = run_params(exit_id, key, max_attempts)
    (bump_sql, bump_k), (unit_sql, unit_k) = _driver_sql(conn.dialect)
    try:
        bumped = driver.execute(bump_sql, {**bump_k, **unit}).fetchone()
    except psycopg.Error as exc:
        raise _failed(conn, exc, bump_sql, unit) from exc
    if bumped is None:
        return None, None
    attempts: int = bumped[0]
    if attempts > max_attempts:
        return attempts, None
    try:
        row = driver.execute(unit_sql, {**unit_k, **unit}).fetchone()
    except psycopg.Error as exc:
        raise TeacherUnitFailed(attempts, _failed(conn, exc, unit_sql, unit)) from exc
    if row is None:
        # Within the count but not claimed: another copy of the task has claimed the unit, or
        # has counted past the cap and dead-letters it.
        return attempts, UnitResult(False)
    *progress, dropped = row
    outcome = Outcome(classes_removed=sorted(dropped or []))
    return attempts, counted(progress, UnitKind.TEACHER, outcome)


def _failed(conn: Connection, exc: psycopg.Error, sql: str, unit: dict[str, Any]) -> StatementError:
    """What SQLAlchemy does with a driver error: a lost connection leaves the pool, and the error
    is raised as SQLAlchemy's (which the task's retries classify). In autocommit a failed
    statement leaves no transaction open."""
    if conn.dialect.is_disconnect(type_cast(Any, exc), conn.connection, None):
        conn.invalidate(exc)
    return DBAPIError.instance(
        sql, unit, exc, psycopg.Error, connection_invalidated=conn.invalidated, dialect=conn.dialect
    )
