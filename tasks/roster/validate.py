"""Validating a roster snapshot whole, before anything is written: its shape (``parse_snapshot``),
then every id it names (``check_references``). A bad snapshot is refused with every problem
named by its record's path and id, never by a name or an email.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from models import Account, Class, CleverRole, District
from tasks.roster.shapes import (
    ID_MAX_LENGTH,
    ID_PATTERN,
    CleverSection,
    CleverUser,
    Snapshot,
    SnapshotError,
)
from tasks.sql import existing_ids
from tasks.storable import explain

MAX_PROBLEMS = 20  # named one by one; beyond, only counted


class _Problems:
    """The problems of one snapshot, each naming its record by path and id (never by personal
    data), reported together: a seed file is fixed in one round, not one problem per run."""

    def __init__(self) -> None:
        self.named: list[str] = []
        self.count = 0

    def add(self, problem: str) -> None:
        self.count += 1
        if len(self.named) < MAX_PROBLEMS:
            self.named.append(problem)

    def error(self) -> SnapshotError:
        # One line: the CLI prints it after the file's name.
        more = self.count - len(self.named)
        return SnapshotError(
            "; ".join(self.named) + (f"; and {more} more problems" if more else "")
        )

    def raise_any(self) -> None:
        if self.count:
            raise self.error()


def _record_id(node: Any) -> str | None:
    """A record's id, if it has one that is one: a malformed "id" may hold an email or a name."""
    found = node.get("id") if isinstance(node, dict) else None
    if isinstance(found, str) and len(found) <= ID_MAX_LENGTH and re.fullmatch(ID_PATTERN, found):
        return found
    return None


def _where(data: Any, loc: Sequence[int | str]) -> str:
    """Name a record by its path and id, never by its personal data."""
    path = ""
    node = data
    record_id = None
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
        record_id = _record_id(node) or record_id
    return f"{path} (id {record_id})" if record_id else path


# The snapshot's lists of records, by path: a record of one that has the wrong shape is left out
# of the reference check, which then still runs over the others.
RECORD_LISTS: tuple[tuple[str, ...], ...] = (
    ("districts",),
    ("users",),
    ("sections",),
    ("platform", "accounts"),
    ("platform", "classes"),
    ("platform", "goals"),
    ("platform", "assignments"),
    ("platform", "progress"),
)


@dataclass
class Parsed:
    """A snapshot's records whose shape is right, and the problems of the others."""

    snapshot: Snapshot | None  # None: its structure is too broken to read any reference
    problems: _Problems = field(default_factory=_Problems)
    # The ids of the records refused for their shape: a reference to one is not a problem of its
    # own (the record's is named already).
    malformed: set[str] = field(default_factory=set)


def parse_snapshot(data: Any) -> Parsed:
    """The snapshot's shape, every record checked: those with the wrong shape are named (each by
    its path and id) and left out, so that the references of the rest are checked in the same
    pass (``check_references``)."""
    if not isinstance(data, dict):
        raise SnapshotError(
            "a roster snapshot is a JSON object with districts, users, sections, platform"
        )
    try:
        return Parsed(Snapshot.model_validate(data))
    except ValidationError as exc:
        parsed = Parsed(None)
        # pydantic's messages name what was expected, never the input (personal data).
        errors = exc.errors(include_input=False, include_url=False)
        for err in errors:
            parsed.problems.add(f"{_where(data, err['loc'])}: {explain(err)}")
        salvaged = _without_records(data, [err["loc"] for err in errors], parsed.malformed)
        if salvaged is not None:
            try:
                parsed.snapshot = Snapshot.model_validate(salvaged)
            except ValidationError:
                parsed.snapshot = None
        return parsed


def _without_records(
    data: dict[str, Any], locs: Sequence[Sequence[int | str]], malformed: set[str]
) -> dict[str, Any] | None:
    """``data`` without the records the errors at ``locs`` are in, whose ids go in
    ``malformed``; None if an error is not inside a record (a list that is not one, say)."""
    bad: dict[tuple[str, ...], set[int]] = {}
    for loc in locs:
        path = next((p for p in RECORD_LISTS if tuple(loc[: len(p)]) == p), None)
        if path is None or len(loc) == len(path) or not isinstance(loc[len(path)], int):
            return None
        bad.setdefault(path, set()).add(int(loc[len(path)]))
    kept = dict(data)
    if isinstance(data.get("platform"), dict):
        kept["platform"] = dict(data["platform"])
    for records_at, indexes in bad.items():
        parent = kept if len(records_at) == 1 else kept["platform"]
        records = parent[records_at[-1]]
        malformed.update(i for n in indexes if (i := _record_id(records[n])) is not None)
        parent[records_at[-1]] = [r for n, r in enumerate(records) if n not in indexes]
    return kept


def _duplicates(problems: _Problems, kind: str, ids: Iterable[str]) -> None:
    seen: set[str] = set()
    for i, record_id in enumerate(ids):
        if record_id in seen:
            problems.add(f"{kind}[{i}] (id {record_id}): duplicate id")
        seen.add(record_id)


@dataclass
class _Known:
    """The ids a snapshot may name: its own records' and those already in the database."""

    districts: set[str]
    users: dict[str, CleverUser]  # the snapshot's own, whatever their roles
    accounts: set[str]
    classes: set[str]

    def missing(self, what: str, account_id: str) -> str:
        """Why an id that must name an account does not: a staff member or a contact of the
        snapshot has none."""
        if account_id in self.users:
            return f"user {account_id} has no platform role"
        return f"unknown {what} {account_id}"


def check_references(session: Session, parsed: Parsed) -> Snapshot:
    """Every id the snapshot names must be in the snapshot or already in the database. Raises
    one ``SnapshotError`` naming every problem, of shape and of reference alike (up to
    ``MAX_PROBLEMS``, then their number); else gives the snapshot back."""
    problems, snap = parsed.problems, parsed.snapshot
    if snap is None:
        raise problems.error()
    _check_duplicates(problems, snap)
    malformed = parsed.malformed
    known = _Known(
        districts=_known_districts(session, snap) | malformed,
        users={u.id: u for u in snap.users},
        accounts=_known_accounts(session, snap, problems) | malformed,
        classes=_known_classes(session, snap, problems) | malformed,
    )
    # A 100k-student district has a million links to check: the per-link loops only run to name
    # the bad records once a whole-list set operation has found one.
    _check_users(problems, snap, known)
    _check_sections(problems, snap.sections, known)
    _check_platform_classes(problems, snap, known)
    _check_class_items(problems, snap, known)
    _check_progress(problems, snap, known)
    problems.raise_any()
    return snap


def _check_duplicates(problems: _Problems, snap: Snapshot) -> None:
    _duplicates(problems, "districts", (d.id for d in snap.districts))
    _duplicates(problems, "users", (u.id for u in snap.users))
    _duplicates(problems, "sections", (s.id for s in snap.sections))
    _duplicates(problems, "platform.accounts", (a.id for a in snap.platform.accounts))
    _duplicates(problems, "platform.classes", (c.id for c in snap.platform.classes))
    _duplicates(problems, "platform.goals", (g.id for g in snap.platform.goals))
    _duplicates(problems, "platform.assignments", (a.id for a in snap.platform.assignments))


def _known_districts(session: Session, snap: Snapshot) -> set[str]:
    named = {u.district for u in snap.users} | {s.district for s in snap.sections}
    return {d.id for d in snap.districts} | existing_ids(session, District.id, named)


def _known_accounts(session: Session, snap: Snapshot, problems: _Problems) -> set[str]:
    """The snapshot's users holding a platform role and its platform accounts, and the accounts
    it names that are already in the database. A platform account may not take a user's id."""
    users = {u.id for u in snap.users}
    platform = {a.id for a in snap.platform.accounts}
    clashes = users & platform
    for i, a in enumerate(snap.platform.accounts if clashes else ()):
        if a.id in clashes:
            problems.add(f"platform.accounts[{i}] (id {a.id}): id already used by a user")
    # A staff member or a contact gets no account: it is not looked for in the database either.
    accounts = {u.id for u in snap.users if u.holds_platform_role} | platform
    named: set[str] = set()
    for s in snap.sections:
        named.update(s.all_teachers, s.students)
    for c in snap.platform.classes:
        named.update([c.teacher, *c.students])
    for item in (*snap.platform.goals, *snap.platform.assignments):
        if item.created_by:
            named.add(item.created_by)
    named.update(p.user for p in snap.platform.progress)
    return accounts | existing_ids(session, Account.id, named - users - platform)


def _known_classes(session: Session, snap: Snapshot, problems: _Problems) -> set[str]:
    """The snapshot's sections and platform classes, and the classes its goals and assignments
    name that are already in the database. A platform class may not take a section's id."""
    sections = {s.id for s in snap.sections}
    platform = {c.id for c in snap.platform.classes}
    clashes = sections & platform
    for i, c in enumerate(snap.platform.classes if clashes else ()):
        if c.id in clashes:
            problems.add(f"platform.classes[{i}] (id {c.id}): id already used by a section")
    classes = sections | platform
    items = (*snap.platform.goals, *snap.platform.assignments)
    return classes | existing_ids(session, Class.id, {g.class_id for g in items} - classes)


def _check_users(problems: _Problems, snap: Snapshot, known: _Known) -> None:
    for i, u in enumerate(snap.users):
        if u.district not in known.districts:
            problems.add(f"users[{i}] (id {u.id}): unknown district {u.district}")


def _check_sections(problems: _Problems, sections: Sequence[CleverSection], known: _Known) -> None:
    users, accounts = known.users, known.accounts
    # Bound once: looking up an enum member costs more than the dict test it is used in.
    teacher, student = CleverRole.TEACHER, CleverRole.STUDENT
    teachers = {u for u, user in users.items() if teacher in user.roles}
    not_students = {u for u, user in users.items() if student not in user.roles}
    for i, s in enumerate(sections):
        where = f"sections[{i}] (id {s.id})"
        if s.district not in known.districts:
            problems.add(f"{where}: unknown district {s.district}")
        if not s.all_teachers:
            problems.add(f"{where}: a section needs a teacher")
        # Clever's own roles decide: a section's teacher holds ``teacher``, its students
        # ``student`` (a staff member or a contact is neither).
        for t in s.all_teachers:
            if t in users:
                if t not in teachers:
                    problems.add(f"{where}: user {t} is not a teacher")
                elif users[t].district != s.district:
                    problems.add(f"{where}: teacher {t} is in another district")
            elif t not in accounts:
                problems.add(f"{where}: unknown teacher {t}")
        if accounts.issuperset(s.students) and not_students.isdisjoint(s.students):
            continue
        for st in s.students:
            if st in not_students:
                problems.add(f"{where}: user {st} is not a student")
            elif st not in accounts:
                problems.add(f"{where}: unknown student {st}")


def _check_platform_classes(problems: _Problems, snap: Snapshot, known: _Known) -> None:
    for i, c in enumerate(snap.platform.classes):
        where = f"platform.classes[{i}] (id {c.id})"
        if c.teacher not in known.accounts:
            problems.add(f"{where}: {known.missing('teacher', c.teacher)}")
        if known.accounts.issuperset(c.students):
            continue
        for st in c.students:
            if st not in known.accounts:
                problems.add(f"{where}: {known.missing('student', st)}")


def _check_class_items(problems: _Problems, snap: Snapshot, known: _Known) -> None:
    for kind, items in (("goals", snap.platform.goals), ("assignments", snap.platform.assignments)):
        for i, item in enumerate(items):
            where = f"platform.{kind}[{i}] (id {item.id})"
            if item.class_id not in known.classes:
                problems.add(f"{where}: unknown class {item.class_id}")
            if item.created_by is not None and item.created_by not in known.accounts:
                problems.add(f"{where}: {known.missing('account', item.created_by)}")


def _check_progress(problems: _Problems, snap: Snapshot, known: _Known) -> None:
    progress = snap.platform.progress
    if known.accounts.issuperset(p.user for p in progress) and len(
        {(p.user, p.skill) for p in progress}
    ) == len(progress):
        return
    seen: set[tuple[str, str]] = set()
    for i, p in enumerate(progress):
        where = f"platform.progress[{i}] (user {p.user}, skill {p.skill})"
        if p.user not in known.accounts:
            problems.add(f"{where}: {known.missing('user', p.user)}")
        if (p.user, p.skill) in seen:
            problems.add(f"{where}: duplicate progress row")
        seen.add((p.user, p.skill))
