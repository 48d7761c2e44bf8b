"""What a stored roster event changes, read from its payload against what the database holds:
the account it names, the roles a ``users.updated`` takes away, the members a section event
drops. Routing applies them (``tasks.events``); a roster pause asks whether they remove anything
(``tasks.pauses``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Account, Class, ClassTeacher, Enrollment, Role, RosterEvent, platform_roles
from tasks import roster
from tasks.inbox import event_object, previous_attributes


def account_of(session: Session, object_id: str) -> Account | None:
    """The account of a Clever user id."""
    return session.scalar(select(Account).where(Account.clever_id == object_id))


def _roles(obj: Any) -> frozenset[Role]:
    """The platform roles a Clever ``roles`` object holds."""
    return platform_roles(obj) if isinstance(obj, dict) else frozenset()


def lost_roles(ev: RosterEvent, account: Account) -> set[Role]:
    """The platform roles a ``users.updated`` takes away."""
    obj = event_object(ev.payload) or {}
    prev = previous_attributes(ev.payload)
    if "roles" in prev:
        return set(_roles(prev["roles"]) - _roles(obj.get("roles")))
    if "roles" in obj:
        # Sent without what changed: the roles the roster now lists, against the ones we hold.
        return set(account.roles) - _roles(obj["roles"])
    return set()


def _live(session: Session, link: Any, who: Any, class_id: str) -> set[str]:
    return set(
        session.scalars(select(who).where(link.class_id == class_id, link.removed_by.is_(None)))
    )


def gone_members(
    session: Session, ev: RosterEvent, section: roster.CleverSection
) -> tuple[set[str], set[str]]:
    """The students and the teachers a section event no longer lists, of those it listed before
    or the class has now."""
    obj = event_object(ev.payload) or {}
    prev = previous_attributes(ev.payload)
    gone_students: set[str] = set()
    gone_teachers: set[str] = set()
    if "students" in obj:
        before = set(prev.get("students") or []) | _live(
            session, Enrollment, Enrollment.student_id, section.id
        )
        gone_students = before - set(section.students)
    if "teachers" in obj or "teacher" in obj:
        before = set(prev.get("teachers") or []) | _live(
            session, ClassTeacher, ClassTeacher.teacher_id, section.id
        )
        gone_teachers = before - set(section.all_teachers)
    return gone_students, gone_teachers


def live_class(session: Session, class_id: str) -> Class | None:
    """The class, if it is a live district class (synced from Clever, not removed)."""
    klass = session.get(Class, class_id)
    live = klass is not None and klass.district_synced and klass.removed_by is None
    return klass if live else None
