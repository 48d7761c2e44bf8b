"""Soft removal: the journal entries a conversion writes, and the stamping of the district-owned
rows it removes with their entry (``removed_by``), which hides them at once and lets ``restore``
bring them back. Also the audit rows every conversion writes."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from models import (
    Assignment,
    AuditRecord,
    Class,
    ClassTeacher,
    Enrollment,
    Goal,
    JournalEntry,
    JournalKind,
    ReportAccess,
)
from tasks.sql import chunks, execute_dml, in_ids, insert_rows

# Tables whose rows a conversion can soft-remove, children before parents (purge order).
REMOVABLE = (Goal, Assignment, Enrollment, ClassTeacher, ReportAccess, Class)
# Tables hanging off a class, dropped with it.
CLASS_CHILDREN = (Goal, Assignment, Enrollment, ClassTeacher)


def new_batch() -> str:
    """A token shared by the journal rows one call writes: set-based UPDATEs find them by it."""
    return uuid.uuid4().hex


def write_entries(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    insert_rows(session, JournalEntry, rows)
    return len(rows)


def audit(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        insert_rows(session, AuditRecord, rows)


def rowcount(result: Any) -> int:
    return int(result.rowcount or 0)


def mark(
    session: Session,
    model: Any,
    subject: Any,
    subject_ids: Sequence[str],
    batch: str,
    kind: JournalKind,
    extra: ColumnElement[bool] | None = None,
) -> int:
    """Soft-remove the live rows of ``model`` whose ``subject`` is in ``subject_ids``, each
    stamped with its subject's journal entry of this batch."""
    total = 0
    journal_subject = (
        JournalEntry.account_id if kind == JournalKind.ACCOUNT else JournalEntry.class_id
    )
    for chunk in chunks(subject_ids):
        conditions = [in_ids(subject, chunk), model.removed_by.is_(None)]
        if extra is not None:
            conditions.append(extra)
        # UPDATE ... FROM the journal: one join, on Postgres and SQLite alike.
        result = execute_dml(
            session,
            update(model)
            .where(
                *conditions,
                JournalEntry.batch == batch,
                JournalEntry.kind == kind,
                journal_subject == subject,
            )
            .values(removed_by=JournalEntry.id),
        )
        total += rowcount(result)
    return total


def restamp(session: Session, model: Any, entry_ids: Sequence[int], to: int | None) -> int:
    """Stamp the rows removed by ``entry_ids`` with ``to`` (None: live again)."""
    total = 0
    for chunk in chunks(entry_ids):
        result = session.execute(
            update(model)
            .where(in_ids(model.removed_by, chunk))
            .values(removed_by=to)
            .execution_options(synchronize_session=False)
        )
        total += rowcount(result)
    return total


def open_exit_root(session: Session, district_id: str) -> int | None:
    """The journal entry of the district's latest exit that no restore has undone, if any."""
    return session.scalar(
        select(JournalEntry.id)
        .where(
            JournalEntry.kind == JournalKind.DISTRICT,
            JournalEntry.district_id == district_id,
            JournalEntry.restored_at.is_(None),
        )
        .order_by(JournalEntry.id.desc())
        .limit(1)
    )
