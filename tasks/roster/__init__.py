"""The district mirror: roster snapshots (``grassroots seed``, SPEC §5.1) and the roster events
that keep it current. Every Clever user the roster lists has a mirror row with its Clever roles
(``roster_users``), whatever they are; those holding a platform role also a district account.
Validation refuses a bad snapshot whole before anything is written (``validate``); writes are bulk
upserts, so loading the same roster twice changes nothing the second time (``mirror``). The
records' shapes are in ``shapes``.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Account, AccountKind, District, DistrictStatus
from tasks.roster.mirror import (
    MirrorResult,
    delete_roster_users,
    upsert_accounts,
    upsert_districts,
    upsert_platform,
    upsert_roster_users,
    upsert_sections,
    upsert_users,
)
from tasks.roster.shapes import (
    CleverName,
    CleverSection,
    CleverUser,
    DistrictRecord,
    Platform,
    PlatformAccount,
    PlatformAssignment,
    PlatformClass,
    PlatformGoal,
    Policy,
    Progress,
    Snapshot,
    SnapshotError,
)
from tasks.roster.validate import MAX_PROBLEMS, Parsed, check_references, parse_snapshot
from tasks.sql import existing_ids

__all__ = [
    "MAX_PROBLEMS",
    "CleverName",
    "CleverSection",
    "CleverUser",
    "DistrictRecord",
    "MirrorResult",
    "Parsed",
    "Platform",
    "PlatformAccount",
    "PlatformAssignment",
    "PlatformClass",
    "PlatformGoal",
    "Policy",
    "Progress",
    "Snapshot",
    "SnapshotError",
    "check_references",
    "delete_roster_users",
    "load_snapshot",
    "parse_snapshot",
    "upsert_accounts",
    "upsert_districts",
    "upsert_platform",
    "upsert_roster_users",
    "upsert_sections",
    "upsert_users",
]


def load_snapshot(session: Session, data: Any) -> MirrorResult:
    """Validate a roster snapshot whole, then write it: every user's mirror row, and accounts
    for those holding a platform role. Raises ``SnapshotError`` (nothing written) for a malformed
    one. The users and sections of a district that has exited are left out
    (``MirrorResult.left_out``), as are converted accounts from district classes."""
    with _collector_paused():
        parsed = parse_snapshot(data)
        left_out: dict[str, int] = {}
        if parsed.snapshot is not None:
            parsed.snapshot, left_out = _without_exited(session, parsed.snapshot)
        snap = check_references(session, parsed)
        upsert_districts(session, snap.districts)
        upsert_users(session, snap.users)
        upsert_sections(session, _without_converted(session, snap.sections))
        upsert_platform(session, snap.platform)
    p = snap.platform
    return MirrorResult(
        districts=len(snap.districts),
        users=len(snap.users),
        sections=len(snap.sections),
        counts={
            "accounts": len(p.accounts),
            "classes": len(p.classes),
            "goals": len(p.goals),
            "assignments": len(p.assignments),
            "progress": len(p.progress),
        },
        left_out=left_out,
    )


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector.

    Loading a 100k-student snapshot allocates millions of objects (records, rows), none of them
    in reference cycles, and the collector kept re-scanning them all. Reference counting still
    frees everything; cycles wait for the next collection.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _without_exited(session: Session, snap: Snapshot) -> tuple[Snapshot, dict[str, int]]:
    """The snapshot without the users and sections of districts that have exited the program
    (their contract ended: their classes are gone, their people grassroots accounts), nor the
    goals and assignments of those sections, and how many of each it left out. Loading them
    again would bring back, once the exit's removals are purged, district classes for accounts
    that are no longer in any district."""
    exited = set(
        session.scalars(
            select(District.id).where(
                District.id.in_({d.id for d in snap.districts}),
                District.status == DistrictStatus.EXITED,
            )
        )
    )
    users = [u for u in snap.users if u.district not in exited]
    sections = [sec for sec in snap.sections if sec.district not in exited]
    gone = {sec.id for sec in snap.sections if sec.district in exited}
    p = snap.platform
    goals = [g for g in p.goals if g.class_id not in gone]
    assignments = [a for a in p.assignments if a.class_id not in gone]
    left_out = {
        "users": len(snap.users) - len(users),
        "sections": len(snap.sections) - len(sections),
        "goals": len(p.goals) - len(goals),
        "assignments": len(p.assignments) - len(assignments),
    }
    if not exited:
        return snap, left_out
    platform = p.model_copy(update={"goals": goals, "assignments": assignments})
    kept = snap.model_copy(update={"users": users, "sections": sections, "platform": platform})
    return kept, left_out


def _without_converted(session: Session, sections: Sequence[CleverSection]) -> list[CleverSection]:
    """The sections without the accounts converted since (people the roster stopped listing):
    an older snapshot that still lists one in a section does not put it back in the district
    class once a purge has deleted its removed links. A section left with no teacher is left out,
    as its last teacher's leaving removed it."""
    converted = existing_ids(
        session,
        Account.id,
        {p for sec in sections for p in (*sec.all_teachers, *sec.students)},
        Account.kind == AccountKind.GRASSROOTS,
        Account.clever_id.is_not(None),
    )
    if not converted:
        return list(sections)
    kept = []
    for sec in sections:
        teachers = [t for t in sec.all_teachers if t not in converted]
        students = [st for st in sec.students if st not in converted]
        if not teachers:
            continue
        if teachers != sec.all_teachers or students != sec.students:
            sec = sec.model_copy(
                update={"teacher": None, "teachers": teachers, "students": students}
            )
        kept.append(sec)
    return kept
