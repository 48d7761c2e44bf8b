"""District classes leaving: a section Clever deleted, a section that shrank, a class whose last
in-program teacher left (SPEC §3, §4). Everything hanging off a dropped class (teacher links,
enrollments and so the coaching through them, goals, assignments) goes with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from models import AuditAction, Class, ClassTeacher, Enrollment, JournalEntry, JournalKind
from tasks.conversion.journal import CLASS_CHILDREN, audit, mark, new_batch, write_entries
from tasks.conversion.outcome import Outcome
from tasks.errors import NotFound
from tasks.sql import chunks, in_ids

LAST_TEACHER_LEFT = "last_teacher_left"
SECTION_DELETED = "section_deleted"
SECTION_SHRUNK = "section_shrunk"


def drop_class(session: Session, class_id: str, *, trigger: str) -> Outcome:
    """``sections.deleted``: the district class is gone."""
    if session.get(Class, class_id) is None:
        raise NotFound(f"no class {class_id}")
    return drop_classes(session, [class_id], trigger=trigger, rule=SECTION_DELETED)


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
    """Remove district classes with everything hanging off them. Progress is not touched.

    Each class gets a journal entry of its own (under ``parent_id``, or its ``parents`` entry), so
    restoring the cause restores it. A district exit passes ``under``, its own entry: the classes
    are stamped with that directly, as only the whole exit is ever restored, and 20,000 classes
    then cost no journal rows at all (see ``_drop_under``).
    """
    live = _lock_live_district_classes(session, class_ids)
    if not live:
        return Outcome()
    ids = [cid for cid, _ in live]
    if under is not None:
        return _drop_under(session, ids, under)
    batch = new_batch()
    out = Outcome(classes_removed=ids)
    out.journal_entries += write_entries(
        session,
        [
            {
                "parent_id": (parents or {}).get(cid, parent_id),
                "batch": batch,
                "kind": JournalKind.CLASS,
                "class_id": cid,
                "district_id": did,
                "rule": rule,
                "trigger": trigger,
                "before": {},
            }
            for cid, did in live
        ],
    )
    for model in CLASS_CHILDREN:
        out.links_removed += mark(session, model, model.class_id, ids, batch, JournalKind.CLASS)
    mark(session, Class, Class.id, ids, batch, JournalKind.CLASS)
    audit(
        session,
        [
            {
                "action": AuditAction.REMOVE_CLASS,
                "trigger": trigger,
                "subject_type": "class",
                "subject_id": cid,
                "details": {"rule": rule},
            }
            for cid in ids
        ],
    )
    return out


def _lock_live_district_classes(
    session: Session, class_ids: Sequence[str]
) -> list[tuple[str, str | None]]:
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
    return live


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


def drop_orphaned_classes(
    session: Session,
    class_ids: Sequence[str],
    teaching: Sequence[tuple[str, str]],
    batch: str,
    trigger: str,
) -> Outcome:
    """Drop the district classes whose last in-program teacher just left; each drop hangs under
    the journal entry of a teacher who left it (``teaching``: class and teacher pairs, the
    teachers' entries in ``batch``), so restoring that teacher brings the class back."""
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
    return drop_classes(session, orphaned, trigger=trigger, rule=LAST_TEACHER_LEFT, parents=cause)


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
    klass = session.execute(
        select(Class.id, Class.district_id, Class.district_synced)
        .where(Class.id == class_id)
        .with_for_update()
    ).one_or_none()
    if klass is None:
        raise NotFound(f"no class {class_id}")
    if not klass.district_synced:
        return Outcome()
    live_students = _live_members(session, Enrollment, Enrollment.student_id, class_id, students)
    live_teachers = _live_members(
        session, ClassTeacher, ClassTeacher.teacher_id, class_id, teachers
    )
    if not live_students and not live_teachers:
        return Outcome()
    batch = new_batch()
    out = Outcome()
    out.journal_entries += write_entries(
        session,
        [
            {
                "batch": batch,
                "kind": JournalKind.CLASS,
                "class_id": class_id,
                "district_id": klass.district_id,
                "rule": SECTION_SHRUNK,
                "trigger": trigger,
                "before": {"students": live_students, "teachers": live_teachers},
            }
        ],
    )
    for link, who, members in (
        (Enrollment, Enrollment.student_id, live_students),
        (ClassTeacher, ClassTeacher.teacher_id, live_teachers),
    ):
        if members:
            out.links_removed += mark(
                session,
                link,
                link.class_id,
                [class_id],
                batch,
                JournalKind.CLASS,
                extra=in_ids(who, members),
            )
    if live_teachers and not _still_taught(session, class_id):
        out.merge(drop_classes(session, [class_id], trigger=trigger, rule=LAST_TEACHER_LEFT))
    audit(
        session,
        [
            {
                "action": AuditAction.SHRINK_SECTION,
                "trigger": trigger,
                "subject_type": "class",
                "subject_id": class_id,
                "details": {"students": len(live_students), "teachers": len(live_teachers)},
            }
        ],
    )
    return out


def _live_members(
    session: Session, link: Any, who: Any, class_id: str, candidates: Sequence[str]
) -> list[str]:
    """Which of ``candidates`` still have a live link of this kind to the class."""
    if not candidates:
        return []
    return sorted(
        session.scalars(
            select(who).where(
                link.class_id == class_id,
                in_ids(who, list(candidates)),
                link.removed_by.is_(None),
            )
        )
    )


def _still_taught(session: Session, class_id: str) -> bool:
    return bool(
        session.scalar(
            select(
                exists().where(ClassTeacher.class_id == class_id, ClassTeacher.removed_by.is_(None))
            )
        )
    )
