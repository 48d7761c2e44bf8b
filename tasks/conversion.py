"""The conversion rules of SPEC §3, in one place.

Every public function takes a session and ids, does its work with set-based SQL inside the
caller's transaction, and returns an ``Outcome``. None of them commits: the caller's session scope
does, so a failure anywhere (including the learner-data invariant) leaves nothing half-applied.

How removal works: a district-owned row (class, teacher link, enrollment, goal, assignment, report
grant) is never deleted by a conversion. Its ``removed_by`` is set to the journal entry that
removed it, which hides it at once; ``restore`` sets it back to NULL, and ``purge`` deletes it after
the retention window. A second run finds nothing live to remove and writes no journal entry.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    String,
    bindparam,
    cast,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.orm import Session

from models import (
    Account,
    Assignment,
    AuditRecord,
    Class,
    ClassTeacher,
    District,
    Enrollment,
    Goal,
    JournalEntry,
    ReportAccess,
    SkillProgress,
    utcnow,
)
from tasks.errors import InvariantViolation, NotFound, RestoreRefused
from tasks.sql import CHUNK, RowHash, chunks, in_ids, insert_rows

# Tables whose rows a conversion can soft-remove, children before parents (purge order).
REMOVABLE = (Goal, Assignment, Enrollment, ClassTeacher, ReportAccess, Class)
# Tables hanging off a class, dropped with it.
CLASS_CHILDREN = (Goal, Assignment, Enrollment, ClassTeacher)


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Outcome:
    """What a unit of work changed."""

    converted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    classes_removed: list[str] = field(default_factory=list)
    # Links stamped removed one by one; those a district exit hides with their class are not.
    links_removed: int = 0
    journal_entries: int = 0

    def merge(self, other: Outcome) -> Outcome:
        self.converted += other.converted
        self.unchanged += other.unchanged
        self.classes_removed += other.classes_removed
        self.links_removed += other.links_removed
        self.journal_entries += other.journal_entries
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "converted": len(self.converted),
            "unchanged": len(self.unchanged),
            "classes_removed": len(self.classes_removed),
            "links_removed": self.links_removed,
            "journal_entries": self.journal_entries,
        }


# --------------------------------------------------------------------------------------------
# The rules: what an account becomes


# Every combination of the role flags (admin, teacher, student), as the set of roles it means.
_ROLE_SETS = {
    (admin, teacher, student): frozenset(
        role for role, has in (("admin", admin), ("teacher", teacher), ("student", student)) if has
    )
    for admin in (False, True)
    for teacher in (False, True)
    for student in (False, True)
}


@dataclass(frozen=True)
class AccountState:
    roles: frozenset[str]
    kind: str
    status: str
    district_id: str | None

    @classmethod
    def of(cls, row: Any) -> AccountState:
        roles = _ROLE_SETS[bool(row.is_admin), bool(row.is_teacher), bool(row.is_student)]
        return cls(roles, row.kind, row.status, row.district_id)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AccountState:
        return cls(frozenset(data["roles"]), data["kind"], data["status"], data["district_id"])

    def as_json(self) -> dict[str, Any]:
        return {
            "roles": sorted(self.roles),
            "kind": self.kind,
            "status": self.status,
            "district_id": self.district_id,
        }

    def columns(self) -> dict[str, Any]:
        return {
            "is_admin": "admin" in self.roles,
            "is_teacher": "teacher" in self.roles,
            "is_student": "student" in self.roles,
            "kind": self.kind,
            "status": self.status,
            "district_id": self.district_id,
        }


@dataclass(frozen=True)
class Plan:
    """One account's conversion: the state it ends in and which district-owned links go."""

    account_id: str
    target: AccountState
    strip_student: bool
    strip_teacher: bool
    strip_admin: bool
    rule: str


def full_conversion(account_id: str, state: AccountState, policy: str) -> Plan:
    """Leave the program entirely (roster absence or district exit), every role's rule applied.

    Student and teacher: grassroots account, login kept. Admin, by the district's policy:
    ``convert`` makes it a grassroots teacher; ``remove`` keeps the login only for an admin who is
    also a teacher, and otherwise removes the account (admin role and report access go either way).
    """
    roles = set(state.roles)
    status = state.status
    rule = "+".join(sorted(roles)) or "none"
    if "admin" in roles:
        roles.discard("admin")
        if policy == "convert":
            roles.add("teacher")
        elif "teacher" not in roles and "student" not in roles:
            status = "removed"
        rule = f"{rule}:{policy}"
    target = AccountState(frozenset(roles), "grassroots", status, None)
    return Plan(account_id, target, True, True, True, rule)


def role_loss(account_id: str, state: AccountState, lost: Iterable[str], policy: str) -> Plan:
    """A Clever role ended: apply that role's rule and keep the roles that remain.

    An account left with no role has left the program: it gets the full conversion.
    """
    lost = set(lost) & set(state.roles)
    remaining = set(state.roles) - lost
    if state.kind != "district" or not lost:
        return Plan(account_id, state, False, False, False, "none")
    if not remaining:
        return full_conversion(account_id, state, policy)
    target = AccountState(frozenset(remaining), state.kind, state.status, state.district_id)
    return Plan(
        account_id,
        target,
        strip_student="student" in lost,
        strip_teacher="teacher" in lost,
        strip_admin="admin" in lost,
        rule="lost:" + "+".join(sorted(lost)),
    )


# --------------------------------------------------------------------------------------------
# Learner-data invariant


def learner_checksums(session: Session, account_ids: Sequence[str]) -> dict[str, str]:
    """A digest per account of everything it owns as a learner (SPEC §2, right column).

    Identity and login fields, every skill-progress row, and its independent classes with their
    memberships, goals and assignments. A conversion must leave every digest as it found it.

    The database computes it: each owned row is hashed (``RowHash``); an account's digest is the
    count and the sum of its rows' hashes. One statement per thousand accounts, and no
    learner data crosses the wire.
    """
    digests: dict[str, str] = {}
    for ids in chunks(account_ids):
        # The account's memberships of independent classes, first: the few rows the goals and
        # assignments of those classes are then looked up by.
        links = union_all(
            *(
                select(
                    who.label("owner"),
                    literal(link.__tablename__, String).label("tag"),
                    link.class_id.label("class_id"),
                    link.removed_by.label("removed_by"),
                )
                .join(Class, Class.id == link.class_id)
                .where(in_ids(who, ids, skewed=skewed), Class.district_synced.is_(False))
                for link, who, skewed in (
                    # A teacher links to many classes: Postgres keeps its most common ids.
                    (ClassTeacher, ClassTeacher.teacher_id, True),
                    (Enrollment, Enrollment.student_id, False),
                )
            )
        ).cte("links")
        records: list[Select[tuple[str, int]]] = [
            select(
                Account.id.label("owner"),
                RowHash("account", Account.clever_id, Account.email, Account.name).label("hash"),
            ).where(in_ids(Account.id, ids)),
            select(
                SkillProgress.student_id,
                RowHash(
                    "progress", SkillProgress.skill, SkillProgress.points, SkillProgress.mastery
                ),
            ).where(in_ids(SkillProgress.student_id, ids)),
            select(links.c.owner, RowHash(links.c.tag, links.c.class_id, links.c.removed_by)),
            *(
                select(
                    links.c.owner,
                    RowHash(owned.__tablename__, owned.id, owned.class_id, owned.removed_by),
                ).join(owned, owned.class_id == links.c.class_id)
                for owned in (Goal, Assignment)
            ),
        ]
        rows = union_all(*records).subquery()
        for owner, count, total in session.execute(
            # Up to 2**23 rows of 40-bit hashes per account, the sum fits a BIGINT, which reads
            # back faster than the NUMERIC Postgres' sum() gives.
            select(rows.c.owner, func.count(), cast(func.sum(rows.c.hash), BigInteger)).group_by(
                rows.c.owner
            )
        ):
            digests[owner] = f"{count}:{int(total)}"
    return {acct: digests.get(acct, "0:0") for acct in account_ids}


def _check_invariant(session: Session, before: dict[str, str]) -> None:
    after = learner_checksums(session, list(before))
    broken = sorted(a for a, digest in before.items() if after.get(a) != digest)
    if broken:
        raise InvariantViolation(broken)


# --------------------------------------------------------------------------------------------
# Applying plans


def _new_batch() -> str:
    return uuid.uuid4().hex


def _live_synced_classes(states: Iterable[AccountState] = ()) -> Select[tuple[str]]:
    """The live district classes that accounts in these states can be linked to: their own
    districts' classes, or every district's if one of them has no district (a grassroots account
    left with a stray link). Narrowing it is what lets an exit batch skip the enrollment scan:
    once the exit's teacher units have dropped the district's classes the set is empty, and
    Postgres does not read the other side of an empty join."""
    live = select(Class.id).where(Class.district_synced.is_(True), Class.removed_by.is_(None))
    districts = {s.district_id for s in states}
    if not districts or None in districts:
        return live
    return live.where(in_ids(Class.district_id, sorted(d for d in districts if d is not None)))


def _audit(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        insert_rows(session, AuditRecord, rows)


def _lock_accounts(session: Session, ids: Sequence[str]) -> dict[str, AccountState]:
    """Lock the accounts, in id order, and read their state."""
    states: dict[str, AccountState] = {}
    for chunk in chunks(sorted(set(ids))):
        for row in session.execute(
            select(
                Account.id,
                Account.is_admin,
                Account.is_teacher,
                Account.is_student,
                Account.kind,
                Account.status,
                Account.district_id,
            )
            .where(in_ids(Account.id, chunk))
            .order_by(Account.id)
            .with_for_update()
        ):
            states[row.id] = AccountState.of(row)
    return states


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

    students = [p.account_id for p in plans if p.strip_student]
    teachers = [p.account_id for p in plans if p.strip_teacher]
    admins = [p.account_id for p in plans if p.strip_admin]
    live_synced = _live_synced_classes(state[a] for a in ids)
    # None at all (the accounts' districts have exited, say): no link to look for. Asked first, it
    # spares the two lookups below their planning for a thousand ids, which costs more than
    # running them.
    linked = bool(students or teachers) and bool(session.scalar(select(live_synced.exists())))
    enrolled = (
        set(
            session.scalars(
                select(Enrollment.student_id)
                .distinct()
                .where(
                    in_ids(Enrollment.student_id, students),
                    Enrollment.removed_by.is_(None),
                    Enrollment.class_id.in_(live_synced),
                )
            )
        )
        if students and linked
        else set()
    )
    teaching = (
        list(
            session.execute(
                select(ClassTeacher.class_id, ClassTeacher.teacher_id).where(
                    in_ids(ClassTeacher.teacher_id, teachers),
                    ClassTeacher.removed_by.is_(None),
                    ClassTeacher.class_id.in_(live_synced),
                )
            ).tuples()
        )
        if teachers and linked
        else []
    )
    granted = (
        set(
            session.scalars(
                select(ReportAccess.account_id).where(
                    in_ids(ReportAccess.account_id, admins), ReportAccess.removed_by.is_(None)
                )
            )
        )
        if admins
        else set()
    )
    teaching_ids = {t for _, t in teaching}

    changing = [
        p
        for p in plans
        if state[p.account_id] != p.target
        or p.account_id in enrolled
        or p.account_id in teaching_ids
        or p.account_id in granted
    ]
    out.unchanged = sorted(set(ids) - {p.account_id for p in changing})
    if not changing:
        return out

    batch = _new_batch()
    insert_rows(
        session,
        JournalEntry,
        [
            {
                "parent_id": parent_id,
                "batch": batch,
                "kind": "account",
                "account_id": p.account_id,
                "district_id": state[p.account_id].district_id,
                "rule": p.rule,
                "trigger": trigger,
                "before": state[p.account_id].as_json(),
            }
            for p in changing
        ],
    )
    out.journal_entries += len(changing)

    # Lock the classes whose teachers leave before detaching anyone: two co-teachers converted
    # at once would otherwise each see the other still teaching and neither drop the class.
    affected = sorted({c for c, _ in teaching})
    for chunk in chunks(affected):
        session.execute(
            select(Class.id).where(in_ids(Class.id, chunk)).order_by(Class.id).with_for_update()
        )

    if enrolled:
        out.links_removed += _mark(
            session,
            Enrollment,
            Enrollment.student_id,
            sorted(enrolled),
            batch,
            "account",
            extra=Enrollment.class_id.in_(live_synced),
        )
    if teaching:
        out.links_removed += _mark(
            session,
            ClassTeacher,
            ClassTeacher.teacher_id,
            sorted(teaching_ids),
            batch,
            "account",
            extra=ClassTeacher.class_id.in_(live_synced),
        )
    if granted:
        out.links_removed += _mark(
            session, ReportAccess, ReportAccess.account_id, sorted(granted), batch, "account"
        )

    by_target: dict[AccountState, list[str]] = defaultdict(list)
    for p in changing:
        if state[p.account_id] != p.target:
            by_target[p.target].append(p.account_id)
    for target, group in by_target.items():
        for chunk in chunks(group):
            session.execute(
                update(Account)
                .where(in_ids(Account.id, chunk))
                .values(**target.columns(), updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )

    if affected:
        out.merge(_drop_orphaned_classes(session, affected, teaching, batch, trigger))

    _check_invariant(session, before_sums)
    out.converted = sorted(p.account_id for p in changing)
    _audit(
        session,
        [
            {
                "action": "convert",
                "trigger": trigger,
                "subject_type": "account",
                "subject_id": p.account_id,
                "details": {"rule": p.rule},
            }
            for p in changing
        ],
    )
    return out


def _rowcount(result: Any) -> int:
    return int(result.rowcount or 0)


def _mark(
    session: Session,
    model: Any,
    subject: Any,
    subject_ids: Sequence[str],
    batch: str,
    kind: str,
    extra: ColumnElement[bool] | None = None,
) -> int:
    """Soft-remove the live rows of ``model`` whose ``subject`` is in ``subject_ids``, each
    stamped with its subject's journal entry of this batch."""
    total = 0
    journal_subject = JournalEntry.account_id if kind == "account" else JournalEntry.class_id
    for chunk in chunks(subject_ids):
        conditions = [in_ids(subject, chunk), model.removed_by.is_(None)]
        if extra is not None:
            conditions.append(extra)
        # UPDATE ... FROM the journal: one join, on Postgres and SQLite alike.
        result = session.execute(
            update(model)
            .where(
                *conditions,
                JournalEntry.batch == batch,
                JournalEntry.kind == kind,
                journal_subject == subject,
            )
            .values(removed_by=JournalEntry.id)
            .execution_options(synchronize_session=False)
        )
        total += _rowcount(result)
    return total


def _drop_under(session: Session, class_ids: list[str], entry_id: int) -> Outcome:
    """Hide classes under one journal entry. Only the class rows are stamped: their teacher
    links, enrollments (so the coaching through them), goals and assignments are hidden with them,
    as everything reads only live rows of live classes, and come back with them on restore."""
    session.execute(
        update(Class)
        .where(in_ids(Class.id, class_ids), Class.removed_by.is_(None))
        .values(removed_by=entry_id)
        .execution_options(synchronize_session=False)
    )
    return Outcome(classes_removed=class_ids)


def _drop_orphaned_classes(
    session: Session,
    class_ids: Sequence[str],
    teaching: Sequence[tuple[str, str]],
    batch: str,
    trigger: str,
) -> Outcome:
    """Drop the district classes whose last in-program teacher just left; each drop hangs under
    the journal entry of a teacher who left it, so restoring that teacher brings the class back."""
    orphaned: list[str] = []
    for chunk in chunks(class_ids):
        orphaned += session.scalars(
            select(Class.id).where(
                in_ids(Class.id, chunk),
                Class.removed_by.is_(None),
                ~exists().where(
                    ClassTeacher.class_id == Class.id, ClassTeacher.removed_by.is_(None)
                ),
            )
        ).all()
    if not orphaned:
        return Outcome()
    entry_of = dict(
        session.execute(
            select(JournalEntry.account_id, JournalEntry.id).where(JournalEntry.batch == batch)
        )
        .tuples()
        .all()
    )
    cause: dict[str, int | None] = {}
    for class_id, teacher_id in sorted(teaching):
        cause.setdefault(class_id, entry_of.get(teacher_id))
    return drop_classes(session, orphaned, trigger=trigger, rule="last_teacher_left", parents=cause)


def drop_classes(
    session: Session,
    class_ids: Sequence[str],
    *,
    trigger: str,
    rule: str,
    parent_id: int | None = None,
    parents: dict[str, int | None] | None = None,
    under: int | None = None,
) -> Outcome:
    """Remove district classes with everything hanging off them: teacher links, enrollments (and
    so the coaching through them), goals and assignments. Progress is not touched.

    Each class gets a journal entry of its own (under ``parent_id``, or its ``parents`` entry), so
    restoring the cause restores it. A district exit passes ``under``, its own entry: the classes
    are stamped with that directly, as only the whole exit is ever restored, and 20,000 classes
    then cost no journal rows at all (see ``_drop_under``).
    """
    out = Outcome()
    live: list[tuple[str, str | None]] = []
    for chunk in chunks(sorted(set(class_ids))):
        live += (
            session.execute(
                select(Class.id, Class.district_id)
                .where(
                    in_ids(Class.id, chunk),
                    Class.removed_by.is_(None),
                    Class.district_synced.is_(True),
                )
                .order_by(Class.id)
                .with_for_update()
            )
            .tuples()
            .all()
        )
    if not live:
        return out
    ids = [cid for cid, _ in live]
    if under is not None:
        return _drop_under(session, ids, under)
    batch = _new_batch()
    insert_rows(
        session,
        JournalEntry,
        [
            {
                "parent_id": (parents or {}).get(cid, parent_id),
                "batch": batch,
                "kind": "class",
                "class_id": cid,
                "district_id": did,
                "rule": rule,
                "trigger": trigger,
                "before": {},
            }
            for cid, did in live
        ],
    )
    out.journal_entries += len(ids)
    for model in CLASS_CHILDREN:
        out.links_removed += _mark(session, model, model.class_id, ids, batch, "class")
    _mark(session, Class, Class.id, ids, batch, "class")
    out.classes_removed = ids
    _audit(
        session,
        [
            {
                "action": "remove_class",
                "trigger": trigger,
                "subject_type": "class",
                "subject_id": cid,
                "details": {"rule": rule},
            }
            for cid in ids
        ],
    )
    return out


# --------------------------------------------------------------------------------------------
# Entry points for single accounts and classes


def _policy_of(session: Session, district_id: str | None) -> str:
    if district_id is None:
        return "convert"
    policy = session.scalar(select(District.admin_removal).where(District.id == district_id))
    return policy or "convert"


def _state_of(session: Session, account_id: str) -> AccountState:
    row = session.execute(
        select(
            Account.is_admin,
            Account.is_teacher,
            Account.is_student,
            Account.kind,
            Account.status,
            Account.district_id,
        ).where(Account.id == account_id)
    ).one_or_none()
    if row is None:
        raise NotFound(f"no account {account_id}")
    return AccountState.of(row)


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
        policies = {d: _policy_of(session, d) for d in {s.district_id for s in states.values()}}
        plans = [full_conversion(a, states[a], policies[states[a].district_id]) for a in chunk]
        out.merge(apply_plans(session, plans, trigger=trigger, parent_id=parent_id, locked=states))
    return out


def convert_account(session: Session, account_id: str, *, trigger: str) -> Outcome:
    return convert_accounts(session, [account_id], trigger=trigger)


def lose_roles(session: Session, account_id: str, lost: Iterable[str], *, trigger: str) -> Outcome:
    """A ``users.updated`` took roles away (``admin`` is Clever's ``district_admin``)."""
    state = _state_of(session, account_id)
    plan = role_loss(account_id, state, lost, _policy_of(session, state.district_id))
    return apply_plans(session, [plan], trigger=trigger)


def drop_class(session: Session, class_id: str, *, trigger: str) -> Outcome:
    """``sections.deleted``: the district class is gone."""
    if session.get(Class, class_id) is None:
        raise NotFound(f"no class {class_id}")
    return drop_classes(session, [class_id], trigger=trigger, rule="section_deleted")


def shrink_section(
    session: Session,
    class_id: str,
    *,
    students: Sequence[str] = (),
    teachers: Sequence[str] = (),
    trigger: str,
) -> Outcome:
    """``sections.updated`` with fewer students or teachers: those links go, and with them the
    coaching through this class. A class left with no in-program teacher is removed."""
    out = Outcome()
    klass = session.execute(
        select(Class.id, Class.district_id, Class.district_synced)
        .where(Class.id == class_id)
        .with_for_update()
    ).one_or_none()
    if klass is None:
        raise NotFound(f"no class {class_id}")
    if not klass.district_synced:
        return out
    live_students = (
        sorted(
            session.scalars(
                select(Enrollment.student_id).where(
                    Enrollment.class_id == class_id,
                    in_ids(Enrollment.student_id, list(students)),
                    Enrollment.removed_by.is_(None),
                )
            )
        )
        if students
        else []
    )
    live_teachers = (
        sorted(
            session.scalars(
                select(ClassTeacher.teacher_id).where(
                    ClassTeacher.class_id == class_id,
                    in_ids(ClassTeacher.teacher_id, list(teachers)),
                    ClassTeacher.removed_by.is_(None),
                )
            )
        )
        if teachers
        else []
    )
    if not live_students and not live_teachers:
        return out
    batch = _new_batch()
    insert_rows(
        session,
        JournalEntry,
        [
            {
                "batch": batch,
                "kind": "class",
                "class_id": class_id,
                "district_id": klass.district_id,
                "rule": "section_shrunk",
                "trigger": trigger,
                "before": {"students": live_students, "teachers": live_teachers},
            }
        ],
    )
    out.journal_entries += 1
    if live_students:
        out.links_removed += _mark(
            session,
            Enrollment,
            Enrollment.class_id,
            [class_id],
            batch,
            "class",
            extra=in_ids(Enrollment.student_id, live_students),
        )
    if live_teachers:
        out.links_removed += _mark(
            session,
            ClassTeacher,
            ClassTeacher.class_id,
            [class_id],
            batch,
            "class",
            extra=in_ids(ClassTeacher.teacher_id, live_teachers),
        )
        still_taught = session.scalar(
            select(
                exists().where(ClassTeacher.class_id == class_id, ClassTeacher.removed_by.is_(None))
            )
        )
        if not still_taught:
            out.merge(drop_classes(session, [class_id], trigger=trigger, rule="last_teacher_left"))
    _audit(
        session,
        [
            {
                "action": "shrink_section",
                "trigger": trigger,
                "subject_type": "class",
                "subject_id": class_id,
                "details": {"students": len(live_students), "teachers": len(live_teachers)},
            }
        ],
    )
    return out


# --------------------------------------------------------------------------------------------
# District exit (contract end), split into units the pipeline can fan out


@dataclass(frozen=True)
class ExitStart:
    district_id: str
    root_id: int
    started: bool  # False: the exit had already begun, this call only found it


def begin_district_exit(session: Session, district_id: str, *, trigger: str) -> ExitStart:
    """Mark the district exited and open the journal entry every exit step hangs under.

    Idempotent: for a district already exited it returns the open exit's entry.
    """
    district = session.get(District, district_id, with_for_update=True)
    if district is None:
        raise NotFound(f"no district {district_id}")
    if district.status == "exited":
        root = session.scalar(
            select(JournalEntry.id)
            .where(
                JournalEntry.kind == "district",
                JournalEntry.district_id == district_id,
                JournalEntry.restored_at.is_(None),
            )
            .order_by(JournalEntry.id.desc())
            .limit(1)
        )
        if root is None:
            raise RestoreRefused(f"district {district_id} is exited but has no exit on record")
        return ExitStart(district_id, root, started=False)
    entry = JournalEntry(
        batch=_new_batch(),
        kind="district",
        district_id=district_id,
        rule="district_exit",
        trigger=trigger,
        before={"status": district.status},
    )
    session.add(entry)
    district.status = "exited"
    session.flush()
    _audit(
        session,
        [
            {
                "action": "district_exit",
                "trigger": trigger,
                "subject_type": "district",
                "subject_id": district_id,
                "details": {"journal": entry.id},
            }
        ],
    )
    return ExitStart(district_id, entry.id, started=True)


def exit_teacher_ids(session: Session, district_id: str) -> list[str]:
    """Teachers with a live link to a live class of the district: one fan-out unit each."""
    return list(
        session.scalars(
            select(ClassTeacher.teacher_id)
            .distinct()
            .join(Class, Class.id == ClassTeacher.class_id)
            .where(
                Class.district_id == district_id,
                Class.removed_by.is_(None),
                ClassTeacher.removed_by.is_(None),
            )
            .order_by(ClassTeacher.teacher_id)
        )
    )


def exit_account_ids(session: Session, district_id: str) -> list[str]:
    """District accounts of the district still to convert."""
    return list(
        session.scalars(
            select(Account.id)
            .where(Account.district_id == district_id, Account.kind == "district")
            .order_by(Account.id)
        )
    )


# Built once (a district has thousands of teacher units). The classes are locked in id order: a
# co-taught class is in two teachers' units, and the second waits for the first, then finds it
# gone.
_TEACHER_CLASSES_DROP = (
    update(Class)
    .where(
        Class.id.in_(
            select(Class.id)
            .join(ClassTeacher, ClassTeacher.class_id == Class.id)
            .where(
                ClassTeacher.teacher_id == bindparam("unit_teacher"),
                ClassTeacher.removed_by.is_(None),
                Class.district_id == bindparam("unit_district"),
                Class.removed_by.is_(None),
            )
            .order_by(Class.id)
            .with_for_update(of=Class)
            .scalar_subquery()
        ),
        Class.removed_by.is_(None),
    )
    .values(removed_by=bindparam("exit_root"), updated_at=bindparam("exit_now"))
    .returning(Class.id)
)


def exit_teacher_unit(
    session: Session, district_id: str, teacher_id: str, *, root_id: int, trigger: str
) -> Outcome:
    """Drop the district classes this teacher teaches (and so coaching through them)."""
    dropped = session.connection().scalars(
        _TEACHER_CLASSES_DROP,
        {
            "unit_teacher": teacher_id,
            "unit_district": district_id,
            "exit_root": root_id,
            "exit_now": utcnow(),
        },
    )
    return Outcome(classes_removed=sorted(dropped))


def exit_account_batch(
    session: Session, account_ids: Sequence[str], *, root_id: int, trigger: str
) -> Outcome:
    if session.get_bind().dialect.name == "postgresql":
        # The batch's statements run a hundred times with a thousand ids each: psycopg prepares
        # them, and Postgres' generic plan for a prepared statement cannot see that the exit has
        # left no live class to join, so it scans the batch's enrollments (17 ms) where a plan
        # for the actual ids reads nothing (2 ms).
        session.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
    return convert_accounts(session, account_ids, trigger=trigger, parent_id=root_id)


def finish_district_exit(
    session: Session, district_id: str, *, root_id: int, trigger: str
) -> Outcome:
    """Remove what is left of the district: classes no teacher held, and any account the batches
    did not reach (a roster change that arrived during the exit)."""
    leftover = session.scalars(
        select(Class.id).where(Class.district_id == district_id, Class.removed_by.is_(None))
    ).all()
    out = drop_classes(session, leftover, trigger=trigger, rule="district_exit", under=root_id)
    return out.merge(
        convert_accounts(
            session, exit_account_ids(session, district_id), trigger=trigger, parent_id=root_id
        )
    )


def run_district_exit(
    session: Session, district_id: str, *, trigger: str, batch_size: int = CHUNK
) -> Outcome:
    """The whole exit in one transaction: the in-process path (CLI without workers, tests)."""
    start = begin_district_exit(session, district_id, trigger=trigger)
    out = Outcome()
    for teacher_id in exit_teacher_ids(session, district_id):
        out.merge(
            exit_teacher_unit(
                session, district_id, teacher_id, root_id=start.root_id, trigger=trigger
            )
        )
    accounts = exit_account_ids(session, district_id)
    for chunk in chunks(accounts, batch_size):
        out.merge(exit_account_batch(session, chunk, root_id=start.root_id, trigger=trigger))
    return out.merge(
        finish_district_exit(session, district_id, root_id=start.root_id, trigger=trigger)
    )


# --------------------------------------------------------------------------------------------
# Restore and purge


@dataclass
class RestoreResult:
    subject: str
    entries: int = 0
    links_restored: int = 0
    accounts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "entries": self.entries,
            "links_restored": self.links_restored,
            "accounts": self.accounts,
        }


def _descendants(session: Session, roots: Sequence[int]) -> list[int]:
    found: list[int] = list(roots)
    frontier = list(roots)
    while frontier:
        children: list[int] = []
        for chunk in chunks(frontier):
            children += session.scalars(
                select(JournalEntry.id).where(
                    in_ids(JournalEntry.parent_id, chunk), JournalEntry.restored_at.is_(None)
                )
            ).all()
        found += children
        frontier = children
    return found


def _ancestor_exit(session: Session, entry_id: int) -> JournalEntry | None:
    entry = session.get(JournalEntry, entry_id)
    while entry is not None and entry.parent_id is not None:
        entry = session.get(JournalEntry, entry.parent_id)
    if entry is not None and entry.kind == "district" and entry.restored_at is None:
        return entry
    return None


def restore(
    session: Session,
    ref: str,
    *,
    trigger: str,
    retention_days: int,
    now: datetime | None = None,
) -> RestoreResult:
    """Undo conversions of an account (by our id or Clever id) or a whole district exit,
    bringing back exactly what they removed. Nothing to undo is not an error."""
    now = now or utcnow()
    district = session.get(District, ref, with_for_update=True)
    if district is not None:
        root = session.scalar(
            select(JournalEntry.id)
            .where(
                JournalEntry.kind == "district",
                JournalEntry.district_id == ref,
                JournalEntry.restored_at.is_(None),
            )
            .order_by(JournalEntry.id.desc())
            .limit(1)
        )
        roots = [root] if root is not None else []
    else:
        account = session.scalar(
            select(Account).where(or_(Account.id == ref, Account.clever_id == ref))
        )
        if account is None:
            raise NotFound(f"no account or district {ref}")
        ref = account.id
        roots = list(
            session.scalars(
                select(JournalEntry.id).where(
                    JournalEntry.kind == "account",
                    JournalEntry.account_id == ref,
                    JournalEntry.restored_at.is_(None),
                )
            )
        )
        for entry_id in roots:
            exit_entry = _ancestor_exit(session, entry_id)
            if exit_entry is not None:
                raise RestoreRefused(
                    f"account {ref} was converted by the exit of district "
                    f"{exit_entry.district_id}: restore the district instead"
                )
    result = RestoreResult(subject=ref)
    if not roots:
        return result
    entry_ids = _descendants(session, roots)
    entries = session.scalars(
        select(JournalEntry)
        .where(in_ids(JournalEntry.id, entry_ids))
        .order_by(JournalEntry.id.desc())
    ).all()
    cutoff = now - timedelta(days=retention_days)
    for e in entries:
        if e.purged_at is not None or e.created_at < cutoff:
            raise RestoreRefused(
                f"{ref} was converted on {e.created_at:%Y-%m-%d}, past the {retention_days}-day"
                " retention window: its removed data is gone"
            )
        if e.kind == "account" and e.before.get("district_id"):
            status = session.scalar(
                select(District.status).where(District.id == e.before["district_id"])
            )
            if status != "active" and district is None:
                raise RestoreRefused(
                    f"district {e.before['district_id']} has left the program: restore the"
                    " district first"
                )
    result.links_restored += _undo(session, [e.id for e in entries])
    for e in entries:  # newest first, so the oldest entry's "before" is what stays
        if e.kind == "account" and e.account_id is not None:
            before = AccountState.from_json(e.before)
            session.execute(
                update(Account)
                .where(Account.id == e.account_id)
                .values(**before.columns(), updated_at=now)
                .execution_options(synchronize_session=False)
            )
            result.accounts.append(e.account_id)
        elif e.kind == "district" and e.district_id is not None:
            session.execute(
                update(District)
                .where(District.id == e.district_id)
                .values(status=e.before.get("status", "active"), updated_at=now)
                .execution_options(synchronize_session=False)
            )
    _mark_restored(session, [e.id for e in entries], now)
    result.entries = len(entries)
    result.links_restored += _reconcile_classes(session, now)
    result.links_restored -= _rehide_links_of_people_who_left(session)
    result.accounts = sorted(set(result.accounts))
    _audit(
        session,
        [
            {
                "action": "restore",
                "trigger": trigger,
                "subject_type": "district" if district is not None else "account",
                "subject_id": ref,
                "details": result.as_dict(),
            }
        ],
    )
    session.expire_all()
    return result


def _undo(session: Session, entry_ids: Sequence[int]) -> int:
    total = 0
    for chunk in chunks(entry_ids):
        for model in REMOVABLE:
            result = session.execute(
                update(model)
                .where(in_ids(model.removed_by, chunk))
                .values(removed_by=None)
                .execution_options(synchronize_session=False)
            )
            total += _rowcount(result)
    return total


def _mark_restored(session: Session, entry_ids: Sequence[int], now: datetime) -> None:
    for chunk in chunks(entry_ids):
        session.execute(
            update(JournalEntry)
            .where(in_ids(JournalEntry.id, chunk))
            .values(restored_at=now)
            .execution_options(synchronize_session=False)
        )


def _reconcile_classes(session: Session, now: datetime) -> int:
    """A restored teacher link into a class another teacher's conversion dropped brings that
    class back too, with what its drop removed."""
    entry_ids = list(
        session.scalars(
            select(Class.removed_by)
            .distinct()
            .join(ClassTeacher, ClassTeacher.class_id == Class.id)
            .join(JournalEntry, JournalEntry.id == Class.removed_by)
            # Only a drop that a teacher's leaving caused: never a section Clever deleted, nor a
            # whole exit.
            .where(
                JournalEntry.kind == "class",
                JournalEntry.rule == "last_teacher_left",
                ClassTeacher.removed_by.is_(None),
            )
        )
    )
    if not entry_ids:
        return 0
    restored = _undo(session, [e for e in entry_ids if e is not None])
    _mark_restored(session, [e for e in entry_ids if e is not None], now)
    return restored


def _rehide_links_of_people_who_left(session: Session) -> int:
    """Undoing a class drop brings back every link the drop removed, including those of people
    converted since (their own conversion found the class already gone). Such a link belongs with
    that person's conversion: it is stamped with their latest journal entry, so it stays hidden
    now and comes back if they are restored."""
    hidden = 0
    link_tables: tuple[tuple[Any, Any], ...] = (
        (Enrollment, Enrollment.student_id),
        (ClassTeacher, ClassTeacher.teacher_id),
    )
    for link, who in link_tables:
        stray = session.execute(
            select(link.class_id, who)
            .join(Class, Class.id == link.class_id)
            .join(Account, Account.id == who)
            .where(
                link.removed_by.is_(None),
                Class.district_synced.is_(True),
                # A link in a class that is still removed (a district exit's) is hidden with it.
                Class.removed_by.is_(None),
                or_(Account.kind != "district", Account.status != "active"),
            )
        ).all()
        for class_id, account_id in stray:
            entry = session.scalar(
                select(JournalEntry.id)
                .where(
                    JournalEntry.kind == "account",
                    JournalEntry.account_id == account_id,
                    JournalEntry.restored_at.is_(None),
                )
                .order_by(JournalEntry.id.desc())
                .limit(1)
            )
            if entry is None:
                raise InvariantViolation([account_id])
            session.execute(
                update(link)
                .where(link.class_id == class_id, who == account_id)
                .values(removed_by=entry)
                .execution_options(synchronize_session=False)
            )
            hidden += 1
    return hidden


def purge(session: Session, *, retention_days: int, now: datetime | None = None) -> int:
    """Hard-delete what conversions removed more than ``retention_days`` ago. Returns the number
    of journal entries purged; their headers stay as the record of what happened."""
    now = now or utcnow()
    cutoff = now - timedelta(days=retention_days)
    expired = list(
        session.scalars(
            select(JournalEntry.id).where(
                JournalEntry.created_at < cutoff,
                JournalEntry.restored_at.is_(None),
                JournalEntry.purged_at.is_(None),
            )
        )
    )
    for chunk in chunks(expired):
        classes = list(session.scalars(select(Class.id).where(in_ids(Class.removed_by, chunk))))
        for model in REMOVABLE[:-1]:
            condition: ColumnElement[bool] = in_ids(model.removed_by, chunk)
            if classes and hasattr(model, "class_id"):
                condition = or_(condition, in_ids(model.class_id, classes))
            session.execute(
                delete(model).where(condition).execution_options(synchronize_session=False)
            )
        if classes:
            session.execute(
                delete(Class)
                .where(in_ids(Class.id, classes))
                .execution_options(synchronize_session=False)
            )
        session.execute(
            update(JournalEntry)
            .where(in_ids(JournalEntry.id, chunk))
            .values(purged_at=now)
            .execution_options(synchronize_session=False)
        )
    return len(expired)
