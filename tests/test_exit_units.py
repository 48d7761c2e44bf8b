"""A teacher unit counted, then run as one statement (Postgres): the count commits first, whatever
becomes of the unit, and a unit started too often does not run."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Connection, Engine, insert, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from models import Class as Klass
from models import ClassTeacher, DistrictExit, ExitUnit
from tasks import exits, teacher_units
from tasks.attempts import unit_params
from tasks.roster import load_snapshot
from tests.support.databases import PgDatabases
from tests.support.scenario import DISTRICT, KIM, example
from worker.db import make_engine
from worker.tasking import is_transient


@dataclass
class Exit:
    engine: Engine
    exit_id: int
    key: str  # Kim's teacher unit


@pytest.fixture
def started(pg_databases: PgDatabases) -> Iterator[Exit]:
    engine = make_engine(pg_databases.new())
    with Session(engine) as session, session.begin():
        load_snapshot(session, example())
        plan = exits.start_exit(session, DISTRICT, trigger="test")
    assert (exits.TEACHER_UNIT + KIM, "teacher") in plan.pending
    yield Exit(engine, plan.exit_id, exits.TEACHER_UNIT + KIM)
    engine.dispose()


def unit_state(ex: Exit) -> tuple[str, int]:
    with ex.engine.connect() as conn:
        row = conn.execute(
            select(ExitUnit.status, ExitUnit.attempts).where(
                ExitUnit.exit_id == ex.exit_id, ExitUnit.key == ex.key
            )
        ).one()
    return row.status, row.attempts


def kims_live_classes(ex: Exit) -> list[str]:
    with ex.engine.connect() as conn:
        return list(
            conn.scalars(
                select(Klass.id)
                .join(ClassTeacher, ClassTeacher.class_id == Klass.id)
                .where(ClassTeacher.teacher_id == KIM, Klass.removed_by.is_(None))
                .where(Klass.district_id == DISTRICT)
            )
        )


def autocommit(ex: Exit) -> Connection:
    return ex.engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def test_the_count_and_the_unit_go_together_and_a_redelivery_finds_it_done(started: Exit) -> None:
    ex = started
    classes = kims_live_classes(ex)
    assert classes
    with autocommit(ex) as conn:
        attempts, result = teacher_units.count_and_run_teacher_unit(
            conn, ex.exit_id, ex.key, max_attempts=3
        )
        assert attempts == 1 and result is not None and result.ran
        assert sorted(result.outcome.classes_removed) == sorted(classes)
        again = teacher_units.count_and_run_teacher_unit(conn, ex.exit_id, ex.key, max_attempts=3)
        assert again == (None, None)
    assert unit_state(ex) == ("done", 1)
    assert kims_live_classes(ex) == []
    with ex.engine.connect() as conn:
        done = select(DistrictExit.units_done).where(DistrictExit.id == ex.exit_id)
        assert conn.scalar(done) == 1


def test_a_unit_started_too_often_is_counted_but_not_run(started: Exit) -> None:
    ex = started
    with ex.engine.begin() as conn:
        conn.execute(
            update(ExitUnit)
            .where(ExitUnit.exit_id == ex.exit_id, ExitUnit.key == ex.key)
            .values(attempts=3)
        )
    classes = kims_live_classes(ex)
    with autocommit(ex) as conn:
        assert teacher_units.count_and_run_teacher_unit(
            conn, ex.exit_id, ex.key, max_attempts=3
        ) == (
            4,
            None,
        )
    assert unit_state(ex) == ("pending", 4)
    assert kims_live_classes(ex) == classes


def test_a_unit_that_fails_keeps_its_count_and_runs_once_the_lock_is_gone(started: Exit) -> None:
    ex = started
    classes = kims_live_classes(ex)
    with ex.engine.connect() as holder:
        holder.execute(select(Klass.id).where(Klass.id.in_(classes)).with_for_update())
        with autocommit(ex) as conn:
            conn.execute(text("SET lock_timeout = '100ms'"))
            with pytest.raises(teacher_units.TeacherUnitFailed) as failed:
                teacher_units.count_and_run_teacher_unit(conn, ex.exit_id, ex.key, max_attempts=3)
            conn.execute(text("RESET lock_timeout"))
        holder.rollback()
    assert failed.value.attempts == 1
    assert isinstance(failed.value.error, OperationalError) and is_transient(failed.value.error)
    assert unit_state(ex) == ("pending", 1)
    assert kims_live_classes(ex) == classes
    with Session(ex.engine) as session, session.begin():
        assert exits.run_unit(session, ex.exit_id, ex.key).ran
    assert unit_state(ex) == ("done", 1)
    assert kims_live_classes(ex) == []


def _scans_of(plan: dict[str, object], table: str) -> list[dict[str, object]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan that scans ``table``."""
    scans = plan.get("Relation Name") == table and "Scan" in str(plan.get("Node Type"))
    found = [plan] if scans else []
    for child in plan.get("Plans", []):  # type: ignore[attr-defined]
        found += _scans_of(child, table)
    return found


def test_a_unit_finds_its_row_by_key_whatever_the_statistics_say(
    pg_databases: PgDatabases,
) -> None:
    """Statistics taken before the exit (autovacuum saw no unit) say nothing of the units' status:
    each statement of a unit must still probe its own key, never walk the units by status (on a
    10,000-student district an index on status alone was taken, and each unit's four lookups
    scanned the pending units: bench/README.md)."""
    engine = make_engine(pg_databases.new())
    with Session(engine) as session, session.begin():
        load_snapshot(session, example())
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))
    with Session(engine) as session, session.begin():
        plan = exits.start_exit(session, DISTRICT, trigger="test")
        session.execute(
            insert(ExitUnit),
            [
                # A district of a thousand teachers, keyed like Clever's ids.
                {"exit_id": plan.exit_id, "key": f"teacher:{n:024x}", "kind": "teacher"}
                for n in range(1000)
            ],
        )
    unit = {
        **unit_params(plan.exit_id, exits.TEACHER_UNIT + KIM),
        "unit_now": None,
        "unit_teacher": KIM,
        "unit_max_attempts": 3,
    }
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        for sql, constants in teacher_units._driver_sql(conn.dialect):
            explained = driver.execute(f"EXPLAIN (FORMAT JSON) {sql}", {**constants, **unit})
            (found,) = explained.fetchone()[0]
            for scan in _scans_of(found["Plan"], "exit_units"):
                assert "key" in str(scan.get("Index Cond", "")), (sql, scan)
    engine.dispose()
