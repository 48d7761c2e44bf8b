"""Carrying out conversion plans (``tasks.conversion.rules``) with set-based SQL, for one account
or a batch of a thousand, inside the caller's transaction: lock the accounts, journal them,
stamp their district-owned links removed, update them, drop the classes their leaving orphaned,
and check the learner-data invariant before anything commits."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Select,
    Update,
    bindparam,
    literal,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.orm import Session

from models import (
    ROLE_COLUMNS,
    Account,
    AdminRemoval,
    AuditAction,
    Class,
    ClassTeacher,
    District,
    Enrollment,
    JournalKind,
    ReportAccess,
    Role,
    utcnow,
)
from tasks.conversion.classes import drop_orphaned_classes
from tasks.conversion.invariant import check_invariant, learner_checksums
from tasks.conversion.journal import audit, mark, new_batch, write_entries
from tasks.conversion.outcome import Outcome
from tasks.conversion.rules import AccountState, Plan, full_conversion, role_loss
from tasks.errors import NotFound
from tasks.sql import InIds, chunks, execute_dml, ids_params, in_ids

# What ``AccountState.of`` reads.
STATE_COLUMNS = (
    Account.id,
    *(getattr(Account, column) for column in ROLE_COLUMNS),
    Account.kind,
    Account.status,
    Account.district_id,
)


def convert_accounts(
    session: Session, account_ids: Sequence[str], *, trigger: str, parent_id: int | None = None
) -> Outcome:
    """Convert accounts that left the program (roster absence, or a batch of a district exit)."""
    out = Outcome()
    for chunk in chunks(list(dict.fromkeys(account_ids))):
        states = _lock_accounts(session, chunk)
        missing = sorted(set(chunk) - set(states))
        if missing:
            raise NotFound(f"no account {missing[0]}")
        # Only an admin's plan reads its district's policy: a student's costs no lookup.
        policies = {
            d: admin_removal_of(session, d)
            for d in {s.district_id for s in states.values() if Role.ADMIN in s.roles}
        }
        plans = [
            full_conversion(a, states[a], policies.get(states[a].district_id, AdminRemoval.CONVERT))
            for a in chunk
        ]
        out.merge(apply_plans(session, plans, trigger=trigger, parent_id=parent_id, locked=states))
    return out


def convert_account(session: Session, account_id: str, *, trigger: str) -> Outcome:
    return convert_accounts(session, [account_id], trigger=trigger)


def lose_roles(session: Session, account_id: str, lost: Iterable[str], *, trigger: str) -> Outcome:
    """A ``users.updated`` took roles away (``admin`` is Clever's ``district_admin``)."""
    row = session.execute(select(*STATE_COLUMNS).where(Account.id == account_id)).one_or_none()
    if row is None:
        raise NotFound(f"no account {account_id}")
    state = AccountState.of(row)
    plan = role_loss(account_id, state, lost, admin_removal_of(session, state.district_id))
    return apply_plans(session, [plan], trigger=trigger)


def admin_removal_of(session: Session, district_id: str | None) -> str:
    """The district's ``admin_removal`` policy (``convert`` for no district)."""
    if district_id is None:
        return AdminRemoval.CONVERT
    policy = session.scalar(select(District.admin_removal).where(District.id == district_id))
    return policy or AdminRemoval.CONVERT


def _lock_accounts(session: Session, ids: Sequence[str]) -> dict[str, AccountState]:
    """Lock the accounts, in id order, and read their state."""
    states: dict[str, AccountState] = {}
    for chunk in chunks(sorted(set(ids))):
        as_text, params = ids_params(_ACCOUNTS, chunk)
        for row in session.execute(_locking(as_text), params):
            states[row.id] = AccountState.of(row)
    return states


# The name the accounts' ids are given under in the statements built once (``ids_params``):
# every event's conversion runs them, and building one costs more than running it for one account.
_ACCOUNTS = "accounts"


@functools.cache
def _locking(as_text: bool) -> Select[Any]:
    return (
        select(*STATE_COLUMNS)
        .where(InIds.named(Account.id, _ACCOUNTS, as_text=as_text))
        .order_by(Account.id)
        .with_for_update()
    )


@dataclass(frozen=True)
class _Links:
    """The live district-owned links of the accounts being converted, as the plans ask."""

    enrolled: set[str]  # students with a live enrollment in a live district class
    teaching: list[tuple[str, str]]  # (class, teacher) of live district classes
    granted: set[str]  # admins with live report access
    live_synced: Select[tuple[str]]

    @property
    def teachers(self) -> set[str]:
        return {t for _, t in self.teaching}

    def holds(self, account_id: str) -> bool:
        return (
            account_id in self.enrolled
            or account_id in self.teachers
            or (account_id in self.granted)
        )


def apply_plans(
    session: Session,
    plans: Sequence[Plan],
    *,
    trigger: str,
    parent_id: int | None = None,
    locked: dict[str, AccountState] | None = None,
) -> Outcome:
    """Carry out conversion plans for up to a batch of accounts, with a bounded number of
    statements however many accounts and links there are. ``locked``: the accounts' states, if
    the caller already holds their locks."""
    out = Outcome()
    if not plans:
        return out
    ids = [p.account_id for p in plans]
    state = locked if locked is not None else _lock_accounts(session, ids)
    missing = sorted(set(ids) - set(state))
    if missing:
        raise NotFound(f"no account {missing[0]}")
    before_sums = learner_checksums(session, ids)
    links = _find_links(session, plans, [state[a] for a in ids])
    changing = [p for p in plans if state[p.account_id] != p.target or links.holds(p.account_id)]
    out.unchanged = sorted(set(ids) - {p.account_id for p in changing})
    if not changing:
        return out

    batch = new_batch()
    out.journal_entries += write_entries(
        session,
        [
            {
                "parent_id": parent_id,
                "batch": batch,
                "kind": JournalKind.ACCOUNT,
                "account_id": p.account_id,
                "district_id": state[p.account_id].district_id,
                "rule": p.rule,
                "trigger": trigger,
                "before": state[p.account_id].as_json(),
            }
            for p in changing
        ],
    )
    # Lock the classes whose teachers leave before detaching anyone: two co-teachers converted
    # at once would otherwise each see the other still teaching and neither drop the class.
    affected = sorted({c for c, _ in links.teaching})
    for chunk in chunks(affected):
        session.execute(
            select(Class.id).where(in_ids(Class.id, chunk)).order_by(Class.id).with_for_update()
        )
    out.links_removed += _remove_links(session, links, batch)
    _update_accounts(session, [p for p in changing if state[p.account_id] != p.target])
    if affected:
        out.merge(drop_orphaned_classes(session, affected, links.teaching, batch, trigger))

    check_invariant(session, before_sums)
    out.converted = sorted(p.account_id for p in changing)
    audit(
        session,
        [
            {
                "action": AuditAction.CONVERT,
                "trigger": trigger,
                "subject_type": "account",
                "subject_id": p.account_id,
                "details": {"rule": p.rule},
            }
            for p in changing
        ],
    )
    return out


def _live_synced_classes(in_districts: ColumnElement[bool] | None) -> Select[tuple[str]]:
    """The live district classes that the accounts being converted can be linked to: those of
    the districts ``in_districts`` names, or every district's (None: one of the accounts has no
    district, a grassroots account left with a stray link). Narrowing it is what lets an exit
    batch skip the enrollment scan: once the exit's teacher units have dropped the district's
    classes the set is empty, and Postgres does not read the other side of an empty join."""
    live = select(Class.id).where(Class.district_synced.is_(True), Class.removed_by.is_(None))
    return live if in_districts is None else live.where(in_districts)


def _districts(states: Iterable[AccountState]) -> list[str] | None:
    """The accounts' districts, for ``_live_synced_classes``; None if one of them has none."""
    districts = {s.district_id for s in states}
    if not districts or None in districts:
        return None
    return sorted(d for d in districts if d is not None)


# What each row of ``_find_links``' lookup is.
ENROLLED, TEACHING, GRANTED = "enrolled", "teaching", "granted"
# The names its ids are given under (``tasks.sql.ids_params``).
_STUDENTS, _TEACHERS, _ADMINS, _DISTRICTS = "students", "teachers", "admins", "districts"


def _find_links(session: Session, plans: Sequence[Plan], states: list[AccountState]) -> _Links:
    students = [p.account_id for p in plans if p.strip_student]
    teachers = [p.account_id for p in plans if p.strip_teacher]
    admins = [p.account_id for p in plans if p.strip_admin]
    districts = _districts(states)
    live_synced = _live_synced_classes(
        None if districts is None else in_ids(Class.district_id, districts)
    )
    # For a batch, asked first whether there is a live class at all (none once an exit's teacher
    # units have run): it spares the lookups below their planning for a thousand ids, which costs
    # more than running them. One account's lookups plan quickly: it goes straight to them.
    linked = bool(students or teachers) and (
        len(plans) == 1 or bool(session.scalar(select(live_synced.exists())))
    )
    asked = {
        _STUDENTS: students if linked else [],
        _TEACHERS: teachers if linked else [],
        _ADMINS: admins,
        _DISTRICTS: districts or [],
    }
    found: dict[str, list[tuple[str, str | None]]] = defaultdict(list)
    if asked[_STUDENTS] or asked[_TEACHERS] or asked[_ADMINS]:
        params: dict[str, Any] = {}
        as_text: dict[str, bool] = {}
        for name, ids in asked.items():
            as_text[name], named = ids_params(name, ids)
            params.update(named)
        lookup = _lookup(
            *(bool(asked[name]) for name in (_STUDENTS, _TEACHERS, _ADMINS)),
            every_district=districts is None,
            as_text=tuple(sorted(as_text.items())),
        )
        # One round trip for the three kinds of link.
        for tag, subject, teacher in session.execute(lookup, params):
            found[tag].append((subject, teacher))
    return _Links(
        enrolled={student for student, _ in found[ENROLLED]},
        teaching=[(klass, teacher) for klass, teacher in found[TEACHING] if teacher is not None],
        granted={admin for admin, _ in found[GRANTED]},
        live_synced=live_synced,
    )


@functools.cache
def _lookup(
    enrolled: bool,
    teaching: bool,
    granted: bool,
    *,
    every_district: bool,
    as_text: tuple[tuple[str, bool], ...],
) -> CompoundSelect[Any]:
    """``_find_links``' statement for the kinds of link asked, built once per shape, its ids
    given when it runs: every event's conversion takes it, and building and keying it cost
    more than running it for one account."""
    text_ids = dict(as_text)

    def named(column: Any, name: str) -> ColumnElement[bool]:
        return InIds.named(column, name, as_text=text_ids[name])

    live_synced = _live_synced_classes(
        None if every_district else named(Class.district_id, _DISTRICTS)
    )
    lookups: list[Select[Any]] = []
    if enrolled:
        lookups.append(
            select(literal(ENROLLED), Enrollment.student_id, null()).where(
                named(Enrollment.student_id, _STUDENTS),
                Enrollment.removed_by.is_(None),
                Enrollment.class_id.in_(live_synced),
            )
        )
    if teaching:
        lookups.append(
            select(literal(TEACHING), ClassTeacher.class_id, ClassTeacher.teacher_id).where(
                named(ClassTeacher.teacher_id, _TEACHERS),
                ClassTeacher.removed_by.is_(None),
                ClassTeacher.class_id.in_(live_synced),
            )
        )
    if granted:
        lookups.append(
            select(literal(GRANTED), ReportAccess.account_id, null()).where(
                named(ReportAccess.account_id, _ADMINS), ReportAccess.removed_by.is_(None)
            )
        )
    return union_all(*lookups)


def _remove_links(session: Session, links: _Links, batch: str) -> int:
    removed = 0
    link_tables: tuple[tuple[Any, Any, set[str]], ...] = (
        (Enrollment, Enrollment.student_id, links.enrolled),
        (ClassTeacher, ClassTeacher.teacher_id, links.teachers),
    )
    for link, who, holders in link_tables:
        if holders:
            removed += mark(
                session,
                link,
                who,
                sorted(holders),
                batch,
                JournalKind.ACCOUNT,
                extra=link.class_id.in_(links.live_synced),
            )
    if links.granted:
        removed += mark(
            session,
            ReportAccess,
            ReportAccess.account_id,
            sorted(links.granted),
            batch,
            JournalKind.ACCOUNT,
        )
    return removed


def _update_accounts(session: Session, plans: Sequence[Plan]) -> None:
    """Each account to its target state: one UPDATE per distinct target and thousand ids."""
    by_target: dict[AccountState, list[str]] = defaultdict(list)
    for p in plans:
        by_target[p.target].append(p.account_id)
    for target, group in by_target.items():
        columns = {**target.columns(), "updated_at": utcnow()}
        for chunk in chunks(group):
            as_text, params = ids_params(_ACCOUNTS, chunk)
            execute_dml(session, _updating(as_text, tuple(columns)), {**params, **columns})


@functools.cache
def _updating(as_text: bool, columns: tuple[str, ...]) -> Update:
    """The accounts set to a state: its ``columns`` given by name when it runs."""
    return (
        update(Account)
        .where(InIds.named(Account.id, _ACCOUNTS, as_text=as_text))
        .values({column: bindparam(column) for column in columns})
    )
