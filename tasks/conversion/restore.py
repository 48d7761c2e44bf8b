"""Undoing conversions within the retention window (``grassroots restore``), and purging what
conversions removed once the window has passed (SPEC §3: removal is soft first)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, or_, select, update
from sqlalchemy.orm import Session

from models import (
    Account,
    AccountKind,
    AccountStatus,
    AuditAction,
    Class,
    ClassTeacher,
    District,
    DistrictStatus,
    Enrollment,
    JournalEntry,
    JournalKind,
    utcnow,
)
from tasks.conversion.classes import LAST_TEACHER_LEFT
from tasks.conversion.journal import REMOVABLE, audit, open_exit_root, restamp
from tasks.conversion.outcome import RestoreResult
from tasks.conversion.rules import LOST, AccountState
from tasks.errors import InvariantViolation, NotFound, RestoreRefused
from tasks.sql import chunks, in_ids


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
        root = open_exit_root(session, ref)
        roots = [root] if root is not None else []
    else:
        ref, roots = _account_roots(session, ref)
    result = RestoreResult(subject=ref)
    if not roots:
        return result
    entries = session.scalars(
        select(JournalEntry)
        .where(in_ids(JournalEntry.id, _descendants(session, roots)))
        .order_by(JournalEntry.id.desc())
    ).all()
    _check_restorable(session, ref, entries, retention_days, now, district)
    result.links_restored += _undo(session, [e.id for e in entries])
    result.accounts = _put_back_subjects(session, entries, now)
    _mark_restored(session, [e.id for e in entries], now)
    result.entries = len(entries)
    result.links_restored += _reconcile_classes(session, now)
    result.links_restored -= _rehide_links_of_people_who_left(session)
    audit(
        session,
        [
            {
                "action": AuditAction.RESTORE,
                "trigger": trigger,
                "subject_type": "district" if district is not None else "account",
                "subject_id": ref,
                "details": result.as_dict(),
            }
        ],
    )
    session.expire_all()
    return result


def give_back_regained(
    session: Session,
    teachers: Iterable[tuple[str, str]],
    students: Iterable[tuple[str, str]],
    *,
    now: datetime | None = None,
) -> int:
    """The roster lists these (class, member) links again: those that their member's own role
    loss removed come back once the member holds that role again (SPEC §5.1: a role the roster
    lists again is given back whole), and with them a class that loss dropped (its last teacher
    left) and what the drop removed. Returns how many links came back."""
    now = now or utcnow()
    back = 0
    role_links: tuple[tuple[Any, Any, Any, Iterable[tuple[str, str]]], ...] = (
        (ClassTeacher, ClassTeacher.teacher_id, Account.is_teacher, teachers),
        (Enrollment, Enrollment.student_id, Account.is_student, students),
    )
    for link, who, holds, pairs in role_links:
        # Removed links only (a partial index): a snapshot's many live ones are not read, and
        # what it lists is looked at only when one of them may come back.
        lost = session.execute(
            select(link.class_id, who)
            .join(JournalEntry, JournalEntry.id == link.removed_by)
            .join(Account, Account.id == who)
            .where(
                link.removed_by.is_not(None),
                JournalEntry.kind == JournalKind.ACCOUNT,
                JournalEntry.account_id == who,
                JournalEntry.rule.startswith(f"{LOST}:"),
                holds.is_(True),
                Account.kind == AccountKind.DISTRICT,
                Account.status == AccountStatus.ACTIVE,
            )
        ).all()
        if not lost:
            continue
        listed = set(pairs)
        for class_id, member in [(c, m) for c, m in lost if (c, m) in listed]:
            _stamp_link(session, link, who, class_id, member, None)
            back += 1
    if back:
        back += _reconcile_classes(session, now)
        back -= _rehide_links_of_people_who_left(session)
    return back


def _account_roots(session: Session, ref: str) -> tuple[str, list[int]]:
    """The account's id and its conversions' open journal entries. An account converted by a
    district exit is restored with its district, never alone."""
    account = session.scalar(
        select(Account).where(or_(Account.id == ref, Account.clever_id == ref))
    )
    if account is None:
        raise NotFound(f"no account or district {ref}")
    roots = list(
        session.scalars(
            select(JournalEntry.id).where(
                JournalEntry.kind == JournalKind.ACCOUNT,
                JournalEntry.account_id == account.id,
                JournalEntry.restored_at.is_(None),
            )
        )
    )
    for entry_id in roots:
        exit_entry = _ancestor_exit(session, entry_id)
        if exit_entry is not None:
            raise RestoreRefused(
                f"account {account.id} was converted by the exit of district "
                f"{exit_entry.district_id}: restore the district instead"
            )
    return account.id, roots


def _check_restorable(
    session: Session,
    ref: str,
    entries: Sequence[JournalEntry],
    retention_days: int,
    now: datetime,
    district: District | None,
) -> None:
    cutoff = now - timedelta(days=retention_days)
    for e in entries:
        if e.purged_at is not None or e.created_at < cutoff:
            raise RestoreRefused(
                f"{ref} was converted on {e.created_at:%Y-%m-%d}, past the {retention_days}-day"
                " retention window: its removed data is gone"
            )
        if district is None and e.kind == JournalKind.ACCOUNT and e.before.get("district_id"):
            status = session.scalar(
                select(District.status).where(District.id == e.before["district_id"])
            )
            if status != DistrictStatus.ACTIVE:
                raise RestoreRefused(
                    f"district {e.before['district_id']} has left the program: restore the"
                    " district first"
                )


def _put_back_subjects(
    session: Session, entries: Sequence[JournalEntry], now: datetime
) -> list[str]:
    """Each converted account, and an exited district, back to its state before. Entries come
    newest first, so the oldest entry's ``before`` is what stays."""
    accounts: set[str] = set()
    for e in entries:
        if e.kind == JournalKind.ACCOUNT and e.account_id is not None:
            before = AccountState.from_json(e.before)
            session.execute(
                update(Account)
                .where(Account.id == e.account_id)
                .values(**before.columns(), updated_at=now)
                .execution_options(synchronize_session=False)
            )
            accounts.add(e.account_id)
        elif e.kind == JournalKind.DISTRICT and e.district_id is not None:
            session.execute(
                update(District)
                .where(District.id == e.district_id)
                .values(status=e.before.get("status", DistrictStatus.ACTIVE), updated_at=now)
                .execution_options(synchronize_session=False)
            )
    return sorted(accounts)


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
    if entry is not None and entry.kind == JournalKind.DISTRICT and entry.restored_at is None:
        return entry
    return None


def _undo(session: Session, entry_ids: Sequence[int]) -> int:
    return sum(restamp(session, model, entry_ids, None) for model in REMOVABLE)


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
    entry_ids = [
        e
        for e in session.scalars(
            select(Class.removed_by)
            .distinct()
            .join(ClassTeacher, ClassTeacher.class_id == Class.id)
            .join(JournalEntry, JournalEntry.id == Class.removed_by)
            # Only a drop that a teacher's leaving caused: never a section Clever deleted, nor a
            # whole exit.
            .where(
                JournalEntry.kind == JournalKind.CLASS,
                JournalEntry.rule == LAST_TEACHER_LEFT,
                ClassTeacher.removed_by.is_(None),
            )
        )
        if e is not None
    ]
    if not entry_ids:
        return 0
    restored = _undo(session, entry_ids)
    _mark_restored(session, entry_ids, now)
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
                or_(Account.kind != AccountKind.DISTRICT, Account.status != AccountStatus.ACTIVE),
            )
        ).all()
        for class_id, account_id in stray:
            entry = session.scalar(
                select(JournalEntry.id)
                .where(
                    JournalEntry.kind == JournalKind.ACCOUNT,
                    JournalEntry.account_id == account_id,
                    JournalEntry.restored_at.is_(None),
                )
                .order_by(JournalEntry.id.desc())
                .limit(1)
            )
            if entry is None:
                raise InvariantViolation([account_id])
            _stamp_link(session, link, who, class_id, account_id, entry)
            hidden += 1
    return hidden


def _stamp_link(
    session: Session, link: Any, who: Any, class_id: str, member: str, entry: int | None
) -> None:
    """Stamp one member's link to one class removed by ``entry`` (None: live again)."""
    session.execute(
        update(link)
        .where(link.class_id == class_id, who == member)
        .values(removed_by=entry)
        .execution_options(synchronize_session=False)
    )


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
