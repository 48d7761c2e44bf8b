"""A district exit (contract end, SPEC §3 and §6), whole: every account of the district is
converted and every district class removed, fanned out into units that workers run in parallel.

- ``start_exit`` marks the district exited, opens the journal entry everything hangs under, and
  plans the units in the same transaction: one per teacher (drop that teacher's district classes,
  and so the coaching through them), then batches of accounts to convert. Keys are
  deterministic, so a redelivered start plans nothing twice and the progress is known at once.
- ``run_unit`` runs one unit exactly once: its work, its ``done`` mark and the exit's count
  commit together. ``tasks.teacher_units`` runs a teacher unit on Postgres from the same
  statements, as one statement after the attempt counter: a district has thousands of them.
- ``finish`` removes what no unit reached; ``run_in_process`` does it all in one transaction.

Teacher units run first, then the account batches: a batch run beside them would detach teachers
one account at a time and contend with them for the same class locks; after them it only
converts accounts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    bindparam,
    cast,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.sql import ColumnElement, Select, Subquery
from sqlalchemy.sql.dml import ReturningUpdate

from models import (
    Account,
    AccountKind,
    AuditAction,
    Class,
    ClassTeacher,
    District,
    DistrictExit,
    DistrictStatus,
    ExitStatus,
    ExitUnit,
    JournalEntry,
    JournalKind,
    UnitKind,
    UnitStatus,
    utcnow,
)
from tasks import deadletters
from tasks.attempts import THIS_UNIT, unit_params, unit_subject
from tasks.conversion import Outcome, convert_accounts, drop_classes
from tasks.conversion.journal import audit, new_batch, open_exit_root
from tasks.errors import NotFound, Refused, RestoreRefused
from tasks.sql import CHUNK, AsyncCommit, JsonList, ZeroPadded, in_ids

TEACHER_UNIT = "teacher:"  # a teacher unit's key: this, then the teacher's account id
ACCOUNTS_UNIT = "accounts:"  # an account batch's key: this, then its number
EXIT_RULE = "district_exit"
RESTORED = "restored"  # a progress status only: the exit's row keeps its own status


def trigger_of(exit_id: int) -> str:
    """The trigger the units of an exit journal and audit their work under."""
    return f"exit:{exit_id}"


# --------------------------------------------------------------------------------------------
# Starting


@dataclass(frozen=True)
class ExitPlan:
    exit_id: int
    district_id: str
    pending: list[tuple[str, str]]  # (key, kind) of the units to run now (see ``pending_units``)
    created: bool  # False: the exit had been planned already, this call only found it


def start_exit(
    session: Session, district_id: str, *, trigger: str, batch_size: int = CHUNK
) -> ExitPlan:
    """Begin (or find) the district's exit and its units. Idempotent."""
    root_id = _begin(session, district_id, trigger=trigger)
    existing = session.get(DistrictExit, root_id, with_for_update=True)
    if existing is None:
        planned = DistrictExit(
            id=root_id,
            district_id=district_id,
            trigger=trigger,
            units_total=0,
            teacher_units=0,
            accounts_total=0,
        )
        session.add(planned)
        session.flush()
        teachers, batches = _plan_units(session, root_id, district_id, batch_size)
        planned.teacher_units = teachers
        planned.units_total = teachers + len(batches)
        planned.accounts_total = sum(batches)
    return ExitPlan(root_id, district_id, pending_units(session, root_id), existing is None)


def _begin(session: Session, district_id: str, *, trigger: str) -> int:
    """Mark the district exited and open the journal entry every exit step hangs under; for a
    district already exited, the open exit's entry."""
    district = session.get(District, district_id, with_for_update=True)
    if district is None:
        raise NotFound(f"no district {district_id}")
    if district.status == DistrictStatus.EXITED:
        root = open_exit_root(session, district_id)
        if root is None:
            raise RestoreRefused(f"district {district_id} is exited but has no exit on record")
        return root
    entry = JournalEntry(
        batch=new_batch(),
        kind=JournalKind.DISTRICT,
        district_id=district_id,
        rule=EXIT_RULE,
        trigger=trigger,
        before={"status": district.status},
    )
    session.add(entry)
    district.status = DistrictStatus.EXITED
    session.flush()
    record = {
        "action": AuditAction.DISTRICT_EXIT,
        "trigger": trigger,
        "subject_type": "district",
        "subject_id": district_id,
        "details": {"journal": entry.id},
    }
    audit(session, [record])
    return entry.id


def _plan_units(
    session: Session, exit_id: int, district_id: str, batch_size: int
) -> tuple[int, list[int]]:
    """Write the exit's units, their ids never leaving the database: one per teacher with a live
    link to a live class of the district, then the district accounts still to convert, in
    batches of ``batch_size`` in id order. Returns how many teacher units were written, and the
    size of each batch."""
    now = literal(utcnow(), DateTime(timezone=True))

    def unit(
        source: Subquery, key: ColumnElement[str], kind: UnitKind, ids: ColumnElement[Any]
    ) -> Select[Any]:
        status = literal(UnitStatus.PENDING)
        return select(
            literal(exit_id), key, literal(kind), ids, status, literal(0), now
        ).select_from(source)

    def write(units: Select[Any]) -> list[int]:
        """Insert the units; each one's number of ids."""
        columns = ["exit_id", "key", "kind", "account_ids", "status", "attempts", "dispatched_at"]
        size = func.json_array_length(ExitUnit.account_ids, type_=Integer)
        return list(session.scalars(insert(ExitUnit).from_select(columns, units).returning(size)))

    teachers = (
        select(ClassTeacher.teacher_id.label("id"))
        .join(Class, Class.id == ClassTeacher.class_id)
        .where(
            Class.district_id == district_id,
            Class.removed_by.is_(None),
            ClassTeacher.removed_by.is_(None),
        )
        .distinct()
        .subquery()
    )
    teacher_units = unit(
        teachers, literal(TEACHER_UNIT) + teachers.c.id, UnitKind.TEACHER, JsonList(teachers.c.id)
    )
    written = write(teacher_units.group_by(teachers.c.id))
    accounts = (
        select(
            Account.id,
            ((func.row_number().over(order_by=Account.id) - 1) // batch_size).label("batch"),
        )
        .where(Account.district_id == district_id, Account.kind == AccountKind.DISTRICT)
        .order_by(Account.id)
        .subquery()
    )
    batch_units = unit(
        accounts,
        literal(ACCOUNTS_UNIT) + ZeroPadded(accounts.c.batch, 6),
        UnitKind.ACCOUNTS,
        JsonList(accounts.c.id),
    ).group_by(accounts.c.batch)
    return len(written), write(batch_units)


def _account_ids(session: Session, district_id: str) -> list[str]:
    """District accounts of the district still to convert."""
    return list(
        session.scalars(
            select(Account.id)
            .where(Account.district_id == district_id, Account.kind == AccountKind.DISTRICT)
            .order_by(Account.id)
        )
    )


def pending_units(session: Session, exit_id: int) -> list[tuple[str, str]]:
    """Units still to run, in their phase: every teacher's classes first, then the batches."""
    units = session.execute(
        select(ExitUnit.key, ExitUnit.kind)
        .where(ExitUnit.exit_id == exit_id, ExitUnit.status == UnitStatus.PENDING)
        .order_by(ExitUnit.key)
    ).all()
    teachers = [(key, kind) for key, kind in units if kind == UnitKind.TEACHER]
    return teachers or [(key, kind) for key, kind in units]


def dispatch_pending(session: Session, exit_id: int) -> list[tuple[str, str]]:
    """``pending_units``, stamped as sent now: the caller sends them once this commits."""
    pending = pending_units(session, exit_id)
    session.execute(
        update(ExitUnit)
        .where(ExitUnit.exit_id == exit_id, in_ids(ExitUnit.key, [k for k, _ in pending]))
        .values(dispatched_at=utcnow())
    )
    return pending


# --------------------------------------------------------------------------------------------
# Running a unit


@dataclass(frozen=True)
class UnitResult:
    ran: bool  # False: the unit was already done (a redelivery), or not this copy's to run
    exit_complete: bool = False  # every unit is done: the finish step may run
    teachers_complete: bool = False  # the last teacher unit: the account batches may start
    outcome: Outcome = field(default_factory=Outcome)


# The statements every unit runs, built once (thousands of units each building them afresh spent
# more time in SQLAlchemy's statement construction than in the database). A run is known by its
# ``unit_now``: the claim stamps the unit with it, and the steps after it act only for the run
# whose stamp they find, so they can be sent together without waiting for the claim's answer.

# Marking the unit done is what locks it: a redelivered copy waits, then finds it done. A unit
# started more than ``unit_max_attempts`` times (if not NULL) is not claimed.
CLAIM = (
    update(ExitUnit)
    .where(
        *THIS_UNIT,
        ExitUnit.status == UnitStatus.PENDING,
        # Typed: Postgres cannot tell a parameter's type from ``IS NULL`` alone.
        cast(bindparam("unit_max_attempts"), Integer).is_(None)
        | (ExitUnit.attempts <= bindparam("unit_max_attempts")),
    )
    .values(status=UnitStatus.DONE, finished_at=bindparam("unit_now"))
    .returning(ExitUnit.kind, ExitUnit.account_ids, AsyncCommit())
)
_CLAIMED_NOW = exists().where(
    *THIS_UNIT, ExitUnit.status == UnitStatus.DONE, ExitUnit.finished_at == bindparam("unit_now")
)


def drop_teacher_classes(claimed: ColumnElement[bool]) -> ReturningUpdate[tuple[str]]:
    """The teacher's live classes in the exiting district, removed by the exit if ``claimed``.
    They are locked in id order: a co-taught class is in two teachers' units, and the second
    waits for the first, then finds it gone."""
    return (
        update(Class)
        .where(
            Class.id.in_(
                select(Class.id)
                .join(ClassTeacher, ClassTeacher.class_id == Class.id)
                .where(
                    ClassTeacher.teacher_id == bindparam("unit_teacher"),
                    ClassTeacher.removed_by.is_(None),
                    Class.district_id
                    == select(DistrictExit.district_id)
                    .where(DistrictExit.id == bindparam("unit_exit"))
                    .scalar_subquery(),
                    Class.removed_by.is_(None),
                )
                .order_by(Class.id)
                .with_for_update(of=Class)
                .scalar_subquery()
            ),
            Class.removed_by.is_(None),
            claimed,
        )
        .values(removed_by=bindparam("unit_exit"), updated_at=bindparam("unit_now"))
        .returning(Class.id)
    )


# Last: the counter row is every unit's, and its lock is held to the commit. It serialises
# concurrent units, so exactly one of them sees the last unit done, and exactly one the last
# teacher unit (no account batch runs before that one).
def count_done(claimed: ColumnElement[bool]) -> ReturningUpdate[tuple[int, int, int]]:
    return (
        update(DistrictExit)
        .where(DistrictExit.id == bindparam("unit_exit"), claimed)
        .values(units_done=DistrictExit.units_done + 1, progressed_at=bindparam("unit_now"))
        .returning(DistrictExit.units_done, DistrictExit.units_total, DistrictExit.teacher_units)
    )


_DROP_TEACHER_CLASSES = drop_teacher_classes(_CLAIMED_NOW)
_COUNT_DONE = count_done(_CLAIMED_NOW)
_STATUS = select(ExitUnit.status).where(*THIS_UNIT)


def run_params(exit_id: int, key: str, max_attempts: int | None = None) -> dict[str, Any]:
    teacher = key.removeprefix(TEACHER_UNIT) if key.startswith(TEACHER_UNIT) else None
    return {
        **unit_params(exit_id, key),
        "unit_now": utcnow(),
        "unit_teacher": teacher,
        "unit_max_attempts": max_attempts,
    }


def counted(row: Sequence[Any] | None, kind: str, outcome: Outcome) -> UnitResult:
    if row is None:  # not this run's claim
        return UnitResult(False)
    done, total, teachers = row
    return UnitResult(True, done >= total, kind == UnitKind.TEACHER and done == teachers, outcome)


def run_unit(session: Session, exit_id: int, key: str) -> UnitResult:
    """Run one unit exactly once, in the session's transaction; a failure rolls its mark back."""
    conn = session.connection()
    unit = run_params(exit_id, key)
    claimed = conn.execute(CLAIM, unit).one_or_none()
    if claimed is None:
        return _not_claimed(conn, unit)
    kind, account_ids, _ = claimed
    if kind == UnitKind.TEACHER:
        dropped = conn.scalars(_DROP_TEACHER_CLASSES, unit).all()
        outcome = Outcome(classes_removed=sorted(dropped))
    else:
        if conn.dialect.name == "postgresql":
            # The batch's statements run a hundred times with a thousand ids each: psycopg
            # prepares them, and Postgres' generic plan for a prepared statement cannot see that
            # the exit has left no live class to join, so it scans the batch's enrollments where
            # a plan for the actual ids reads nothing.
            conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        outcome = convert_accounts(
            session, account_ids, trigger=trigger_of(exit_id), parent_id=exit_id
        )
    return counted(conn.execute(_COUNT_DONE, unit).one_or_none(), kind, outcome)


def _not_claimed(conn: Connection, unit: dict[str, Any]) -> UnitResult:
    status = conn.scalar(_STATUS, unit)
    if status is None:
        raise NotFound(f"no unit {unit['unit_key']} in exit {unit['unit_exit']}")
    return UnitResult(False)  # done or dead already, or past its attempts


# --------------------------------------------------------------------------------------------
# Finishing


def finish(session: Session, exit_id: int) -> Outcome | None:
    """The last step: remove what no unit reached (classes no teacher held, accounts a roster
    change added during the exit). None if the exit was already finished or still has pending
    units."""
    district_exit = session.get(DistrictExit, exit_id, with_for_update=True)
    if district_exit is None:
        raise NotFound(f"no exit {exit_id}")
    if (
        district_exit.status == ExitStatus.DONE
        or district_exit.units_done < district_exit.units_total
    ):
        return None
    district_id, trigger = district_exit.district_id, trigger_of(exit_id)
    leftover = session.scalars(
        select(Class.id).where(Class.district_id == district_id, Class.removed_by.is_(None))
    ).all()
    out = drop_classes(session, leftover, trigger=trigger, rule=EXIT_RULE, under=exit_id)
    accounts = _account_ids(session, district_id)
    out.merge(convert_accounts(session, accounts, trigger=trigger, parent_id=exit_id))
    district_exit.status = ExitStatus.DONE
    district_exit.finished_at = utcnow()
    return out


def run_in_process(
    session: Session, district_id: str, *, trigger: str, batch_size: int = CHUNK
) -> Outcome:
    """The whole exit in the session's transaction, unit after unit: the path without workers
    (``grassroots district exit --in-process``, tests)."""
    plan = start_exit(session, district_id, trigger=trigger, batch_size=batch_size)
    out = Outcome()
    while pending := pending_units(session, plan.exit_id):
        for key, _ in pending:
            out.merge(run_unit(session, plan.exit_id, key).outcome)
    return out.merge(finish(session, plan.exit_id) or Outcome())


def stalled_exits(session: Session, *, since: datetime) -> list[int]:
    """Running exits that have not progressed since ``since`` and have no dead unit: a unit was
    lost with a worker, or never reached the broker. They are stamped now, so the next pass
    leaves them alone for as long again."""
    dead = select(ExitUnit.exit_id).where(ExitUnit.status == UnitStatus.DEAD)
    ids = list(
        session.scalars(
            select(DistrictExit.id).where(
                DistrictExit.status == ExitStatus.RUNNING,
                DistrictExit.progressed_at < since,
                # One with a dead unit waits for an operator (``resume``): sending its finish
                # again and again would never end it.
                DistrictExit.id.not_in(dead),
            )
        )
    )
    if ids:
        session.execute(
            update(DistrictExit).where(DistrictExit.id.in_(ids)).values(progressed_at=utcnow())
        )
    return ids


# --------------------------------------------------------------------------------------------
# Progress


STALLED = "stalled"  # a progress status only: a unit is dead, the exit waits for an operator


@dataclass(frozen=True)
class ExitProgress:
    exit_id: int
    district_id: str
    status: str
    units_done: int
    units_total: int
    units_dead: list[str]  # the dead units' keys
    accounts: int
    started_at: datetime
    finished_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "exit": self.exit_id,
            "district": self.district_id,
            "status": self.status,
            "units_total": self.units_total,
            "units_done": self.units_done,
            "units_dead": len(self.units_dead),
            "dead_units": self.units_dead,
            "accounts": self.accounts,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


def progress(session: Session, district_id: str) -> ExitProgress | None:
    """The district's latest exit, if any: ``restored`` once ``grassroots restore`` has undone
    it (its journal root, whose id is the exit's, is marked restored), ``stalled`` while a unit
    is dead, else its own status."""
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
    dead = session.scalars(
        select(ExitUnit.key)
        .where(ExitUnit.exit_id == row.id, ExitUnit.status == UnitStatus.DEAD)
        .order_by(ExitUnit.key)
    ).all()
    status = row.status
    if restored_at is not None:
        status = RESTORED
    elif dead and row.status == ExitStatus.RUNNING:
        status = STALLED
    return ExitProgress(
        row.id,
        row.district_id,
        status,
        row.units_done,
        row.units_total,
        list(dead),
        row.accounts_total,
        row.started_at,
        row.finished_at,
    )


@dataclass(frozen=True)
class Resumed:
    exit_id: int
    units: list[str]  # the dead units sent round again, by their keys


def resume(session: Session, district_id: str, *, by: str) -> Resumed:
    """An operator sends the dead units of the district's running exit round again, by the same
    keys, with a fresh budget of attempts; their dead letters are closed. The exit's pending
    units are sent again with them (``dispatch_exit``)."""
    found = progress(session, district_id)
    if found is None:
        raise NotFound(f"district {district_id} has no exit to resume")
    if found.status in (ExitStatus.DONE, RESTORED):
        raise Refused(f"the exit of district {district_id} is {found.status}: nothing to resume")
    row = session.get(DistrictExit, found.exit_id, with_for_update=True)
    assert row is not None
    session.execute(
        update(ExitUnit)
        .where(ExitUnit.exit_id == row.id, ExitUnit.status == UnitStatus.DEAD)
        .values(status=UnitStatus.PENDING, attempts=0, dispatched_at=utcnow())
    )
    row.progressed_at = utcnow()
    deadletters.resolve(session, [unit_subject(row.id, key) for key in found.units_dead])
    record = {
        "action": AuditAction.RESUME_EXIT,
        "trigger": by,
        "subject_type": "district",
        "subject_id": district_id,
        "details": {"exit": row.id, "units": found.units_dead},
    }
    audit(session, [record])
    return Resumed(row.id, found.units_dead)
