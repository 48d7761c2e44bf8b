"""Reconciling a district's complete pull from the Clever Data API with the mirror (SPEC §5.8).

Additions and field changes (new users, sections and enrollments, renames, gained roles) are
applied directly and set-based, like ``grassroots seed``. Every destructive change — a user
absent from the pull, a lost role, a section absent, a section's members shrunk — is recorded in
the inbox as the Clever event it stands for (``sync:<sync id>:<type>:<object id>``, created when
the pull started), and goes through the same rules, ordering fence, brake, retries, dead letters,
replay and audit as any event. A sync that finds nothing changed writes nothing but its record.

The pull itself (HTTP, paging, the feed position) is ``worker.sync``'s, the sync's record
``tasks.roster_syncs``'; this module only reads and writes the database.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import (
    CLEVER_ROLE_NAMES,
    ROLE_COLUMNS,
    Account,
    AccountKind,
    AccountStatus,
    Class,
    ClassTeacher,
    District,
    DistrictStatus,
    Enrollment,
    EventStatus,
    JournalEntry,
    JournalKind,
    Role,
    RosterUser,
    SyncStatus,
    clever_role,
    platform_roles,
    roles_of,
)
from tasks import brake
from tasks.conversion.rules import LOST
from tasks.inbox import inbox_row, store
from tasks.roster import (
    CleverName,
    CleverSection,
    CleverUser,
    upsert_sections,
    upsert_users,
)
from tasks.roster_syncs import CHANGE_KINDS, Report, finish
from tasks.sql import existing_ids

EMPTY_ROSTER = "empty_roster"
SOURCE = "sync"


@dataclass(frozen=True, slots=True)
class PulledUser:
    id: str
    email: str | None
    name: str | None  # as the mirror keeps it: first and last name
    roles: frozenset[str]  # Clever's role names it holds

    @property
    def platform_roles(self) -> frozenset[Role]:
        return platform_roles(self.roles)


@dataclass(frozen=True, slots=True)
class PulledSection:
    id: str
    name: str
    teachers: tuple[str, ...]
    students: tuple[str, ...]


@dataclass
class Pull:
    """A district's complete pull: what Clever lists now."""

    district_id: str
    district_name: str
    users: dict[str, PulledUser]
    sections: dict[str, PulledSection]
    started_at: datetime


# --------------------------------------------------------------------------------------------
# Reconciling


@dataclass(frozen=True, slots=True)
class _Held:
    """What the mirror holds of a district account, compactly: a district has 100,000. Its email
    and name are compared by their hash."""

    fields: int
    roles: frozenset[Role]


@dataclass
class _Members:
    """One kind of a class's members (teachers, or students): every link, live or removed, but
    those a member's own role loss removed (``regained``), which a pull that lists the member
    there gives back with the role, as ``seed`` does (``conversion.give_back_regained``)."""

    every: dict[str, list[str]]
    removed: set[tuple[str, str]]
    regained: set[tuple[str, str]] = field(default_factory=set)

    def all(self, class_id: str) -> set[str]:
        return set(self.every.get(class_id, ()))

    def live(self, class_id: str) -> set[str]:
        return {m for m in self.every.get(class_id, ()) if (class_id, m) not in self.removed}


@dataclass
class _Mirror:
    """What the database holds of the district, to compare the pull with."""

    district: District | None
    roster: dict[str, frozenset[str]]  # mirror rows: user id -> Clever roles
    accounts: dict[str, _Held]  # district accounts still in the program
    converted: set[str]  # ids of grassroots accounts that Clever lists again
    classes: dict[str, str]  # live district classes: id -> name
    removed_classes: set[str]
    teachers: _Members
    students: _Members


# Rows fetched at a time: the mirror of a big district is read without holding every row twice.
READ_CHUNK = 10_000


def reconcile(
    session: Session, pull: Pull, sync_id: str, *, dry_run: bool, brake_percent: float
) -> Report:
    """Compare the pull with the mirror; apply the additions and record the destructive changes
    as inbox events, unless ``dry_run``; finish the sync's record either way."""
    report = Report(
        district=pull.district_id,
        sync_id=sync_id,
        pulled={"users": len(pull.users), "sections": len(pull.sections)},
        started_at=pull.started_at,
    )
    mirror = _read_mirror(session, pull)
    refusal = _refusal(mirror, pull)
    if refusal is not None:
        report.status, report.reason = SyncStatus.FAILED, refusal
        return finish(session, report)
    plan = _Plan(pull, mirror, sync_id)
    plan.users()
    plan.sections()
    report.changes = plan.changes
    report.held = brake.would_hold(
        session, pull.district_id, plan.account_removals, default_percent=brake_percent
    )
    if not dry_run:
        _apply(session, pull, mirror, plan)
        if plan.events:
            stored = store(session, [inbox_row(e, source=SOURCE) for e in plan.events])
            report.events = [
                i.event_id for i in stored if i.new and i.status == EventStatus.ACCEPTED
            ]
    return finish(session, report)


def _refusal(mirror: _Mirror, pull: Pull) -> str | None:
    if mirror.district is not None and mirror.district.status == DistrictStatus.EXITED:
        return f"district {pull.district_id} has left the program: nothing to sync"
    if not pull.users and mirror.accounts:
        # An empty export read as "everyone left" is the classic disaster of roster sync.
        return EMPTY_ROSTER
    return None


def _fields(email: str | None, name: str | None) -> int:
    return hash((email, name))


def _read_mirror(session: Session, pull: Pull) -> _Mirror:
    district_id = pull.district_id
    # Ids are interned, the same strings as the pull's; a few role sets are shared by all.
    canonical: dict[frozenset[Any], frozenset[Any]] = {}
    roster = {
        sys.intern(uid): canonical.setdefault(frozenset(roles), frozenset(roles))
        for uid, roles in _stream(
            session,
            select(RosterUser.id, RosterUser.roles).where(RosterUser.district_id == district_id),
        )
    }
    accounts = {}
    for row in _stream(
        session,
        select(
            Account.id, Account.email, Account.name, *(getattr(Account, c) for c in ROLE_COLUMNS)
        ).where(
            Account.district_id == district_id,
            Account.kind == AccountKind.DISTRICT,
            Account.status == AccountStatus.ACTIVE,
        ),
    ):
        roles = roles_of(*row[3:])
        held = _Held(_fields(row[1], row[2]), canonical.setdefault(roles, roles))
        accounts[sys.intern(row[0])] = held
    # Accounts converted (the person left, or the district) that Clever lists again.
    converted = existing_ids(
        session, Account.clever_id, pull.users, Account.kind == AccountKind.GRASSROOTS
    )
    classes: dict[str, str] = {}
    removed: set[str] = set()
    for cid, name, removed_by in session.execute(
        select(Class.id, Class.name, Class.removed_by).where(
            Class.district_id == district_id, Class.district_synced.is_(True)
        )
    ):
        if removed_by is None:
            classes[cid] = name
        else:
            removed.add(cid)
    role_losses = _role_losses(session, district_id)
    return _Mirror(
        session.get(District, district_id),
        roster,
        accounts,
        converted,
        classes,
        removed,
        _members(session, district_id, ClassTeacher, ClassTeacher.teacher_id, role_losses),
        _members(session, district_id, Enrollment, Enrollment.student_id, role_losses),
    )


def _stream(session: Session, statement: Any) -> Iterator[Any]:
    return iter(session.execute(statement.execution_options(yield_per=READ_CHUNK)).tuples())


def _role_losses(session: Session, district_id: str) -> dict[int, str]:
    """The journal entries of the district's role losses not restored, and whose each is."""
    rows = session.execute(
        select(JournalEntry.id, JournalEntry.account_id).where(
            JournalEntry.kind == JournalKind.ACCOUNT,
            JournalEntry.district_id == district_id,
            JournalEntry.rule.startswith(f"{LOST}:"),
            JournalEntry.restored_at.is_(None),
        )
    ).tuples()
    return {entry: account for entry, account in rows if account is not None}


def _members(
    session: Session, district_id: str, link: Any, who: Any, role_losses: dict[int, str]
) -> _Members:
    """Every link of one kind to the district's classes. ``role_losses``: the journal entries
    of the district's role losses, by the account each is of."""
    found = _Members(defaultdict(list), set())
    for cid, member, removed_by in _stream(
        session,
        select(link.class_id, who, link.removed_by)
        .join(Class, Class.id == link.class_id)
        .where(Class.district_id == district_id, Class.district_synced.is_(True)),
    ):
        cid, member = sys.intern(cid), sys.intern(member)
        if removed_by is not None and role_losses.get(removed_by) == member:
            found.regained.add((cid, member))
            continue
        found.every[cid].append(member)
        if removed_by is not None:
            found.removed.add((cid, member))
    return found


class _Plan:
    """The differences between a pull and the mirror: what to apply, and the events to record."""

    def __init__(self, pull: Pull, mirror: _Mirror, sync_id: str) -> None:
        self.pull, self.mirror, self.sync_id = pull, mirror, sync_id
        self.changes = dict.fromkeys(CHANGE_KINDS, 0)
        self.upsert: list[PulledUser] = []  # new or changed users
        self.sections_upsert: list[PulledSection] = []
        self.events: list[dict[str, Any]] = []
        self.account_removals = 0  # the users.deleted the brake counts

    def _event(
        self, type_: str, obj: dict[str, Any], previous: dict[str, Any] | None = None
    ) -> None:
        data: dict[str, Any] = {"object": {**obj, "district": self.pull.district_id}}
        if previous is not None:
            data["previous_attributes"] = previous
        self.events.append(
            {
                "id": f"sync:{self.sync_id}:{type_}:{obj['id']}",
                "type": type_,
                "created": self.pull.started_at.isoformat(),
                "data": data,
            }
        )

    # users ----------------------------------------------------------------------------------

    def users(self) -> None:
        mirror, pulled = self.mirror, self.pull.users
        for uid, user in pulled.items():
            account = mirror.accounts.get(uid)
            if uid in mirror.converted:
                # The Clever id reappeared: restored by the event's own rule (SPEC §4).
                self._event("users.created", _user_object(user))
                self.changes["users_created"] += 1
            elif account is None and uid not in mirror.roster:
                self.upsert.append(user)
                self.changes["users_created"] += 1
            else:
                self._known_user(user, account)
        for uid in (set(mirror.accounts) | set(mirror.roster)) - set(pulled):
            held = _clever_roles(mirror.accounts.get(uid), mirror.roster.get(uid))
            self._event("users.deleted", {"id": uid, "roles": held})
            self.account_removals += uid in mirror.accounts
            self.changes["users_deleted"] += 1

    def _known_user(self, user: PulledUser, account: _Held | None) -> None:
        changed = self.mirror.roster.get(user.id) != user.roles
        if account is not None:
            if account.roles - user.platform_roles:
                previous = {"roles": _clever_roles(account, self.mirror.roster.get(user.id))}
                self._event("users.updated", _user_object(user), previous)
                self.changes["roles_lost"] += 1
            changed |= account.fields != _fields(user.email, user.name)
            changed |= bool(user.platform_roles - account.roles)
        elif user.platform_roles:
            changed = True  # a staff member who became a teacher: an account to make
        if changed:
            self.upsert.append(user)
            self.changes["users_updated"] += 1

    # sections -------------------------------------------------------------------------------

    def sections(self) -> None:
        mirror = self.mirror
        for sid, section in self.pull.sections.items():
            if sid in mirror.removed_classes:
                # Removed by a rule already: Clever listing it changes nothing, unless its
                # teacher's role loss removed it, and the teacher is listed there again.
                if any((sid, t) in mirror.teachers.regained for t in section.teachers):
                    self.sections_upsert.append(section)
                    self.changes["sections_updated"] += 1
                continue
            if sid not in mirror.classes:
                # A class needs a teacher we can link; Clever may list a section without one.
                if self.eligible(section.teachers):
                    self.sections_upsert.append(section)
                    self.changes["sections_created"] += 1
                continue
            self._known_section(section)
        for sid in set(mirror.classes) - set(self.pull.sections):
            self._event("sections.deleted", {"id": sid, "name": mirror.classes[sid]})
            self.changes["sections_deleted"] += 1

    def _known_section(self, section: PulledSection) -> None:
        mirror, users = self.mirror, self.pull.users
        sid = section.id
        grown = mirror.classes[sid] != section.name
        grown |= bool(set(self.eligible(section.teachers)) - mirror.teachers.all(sid))
        grown |= bool(set(self.eligible(section.students)) - mirror.students.all(sid))
        if grown:
            self.sections_upsert.append(section)
        # Members the pull no longer lists at all leave with their own users.deleted (and its
        # brake): the shrink names only those the pull still lists.
        live_t, live_s = mirror.teachers.live(sid), mirror.students.live(sid)
        gone_t = {t for t in live_t - set(section.teachers) if t in users}
        gone_s = {s for s in live_s - set(section.students) if s in users}
        if gone_t or gone_s:
            kept_t = [*section.teachers, *sorted(t for t in live_t if t not in users)]
            kept_s = [*section.students, *sorted(s for s in live_s if s not in users)]
            self._event(
                "sections.updated",
                {"id": sid, "name": section.name, "teachers": kept_t, "students": kept_s},
                {"teachers": sorted(live_t), "students": sorted(live_s)},
            )
        if grown or gone_t or gone_s:
            self.changes["sections_updated"] += 1

    def eligible(self, members: Iterable[str]) -> list[str]:
        """The members that can be linked: district accounts, existing or about to be made (a
        converted account stays out of district classes, as ``seed`` keeps it)."""
        users, mirror = self.pull.users, self.mirror
        return [
            m
            for m in members
            if m in mirror.accounts
            or (m in users and users[m].platform_roles and m not in mirror.converted)
        ]


def _apply(session: Session, pull: Pull, mirror: _Mirror, plan: _Plan) -> None:
    if mirror.district is None:
        # Bootstrap: the policy starts as `convert` until an operator sets it.
        session.add(District(id=pull.district_id, name=pull.district_name))
        session.flush()
    elif mirror.district.name != pull.district_name:
        mirror.district.name = pull.district_name
    if plan.upsert:
        upsert_users(session, [_clever_user(pull.district_id, u) for u in plan.upsert])
    if plan.sections_upsert:
        sections = [
            CleverSection(
                id=s.id,
                district=pull.district_id,
                name=s.name,
                teachers=plan.eligible(s.teachers),
                students=plan.eligible(s.students),
            )
            for s in plan.sections_upsert
        ]
        upsert_sections(session, sections)


# --------------------------------------------------------------------------------------------
# Shapes


def _clever_roles(account: _Held | None, mirrored: frozenset[str] | None) -> dict[str, Any]:
    """The Clever ``roles`` object of what the mirror holds of a user."""
    roles = set(mirrored or ())
    if account is not None:
        roles |= {clever_role(r) for r in account.roles}
    return {role: {} for role in sorted(roles)}


def _user_object(user: PulledUser) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "name": {"first": user.name, "last": None},
        "roles": {role: {} for role in sorted(user.roles)},
    }


def _clever_user(district_id: str, user: PulledUser) -> CleverUser:
    # The mirror keeps a name as one string: it goes back in as the first name alone, which
    # ``CleverName.full`` gives back unchanged.
    return CleverUser(
        id=user.id,
        district=district_id,
        email=user.email,
        name=CleverName(first=user.name) if user.name else None,
        roles={role: {} for role in user.roles},
    )


# The few role sets a district's users hold, one object each.
_ROLE_SETS: dict[frozenset[str], frozenset[str]] = {}


def pulled_user(user: CleverUser) -> PulledUser:
    """The parts of a Clever user a sync compares, compactly (a district has 100,000)."""
    roles = frozenset(r for r in user.roles if r in CLEVER_ROLE_NAMES)
    return PulledUser(
        id=sys.intern(user.id),
        email=user.email,
        name=user.name.full() if user.name else None,
        roles=_ROLE_SETS.setdefault(roles, roles),
    )


def pulled_section(section: CleverSection) -> PulledSection:
    # A district's ids appear in many sections: one string each, not one per mention.
    return PulledSection(
        id=section.id,
        name=section.name,
        teachers=tuple(map(sys.intern, section.all_teachers)),
        students=tuple(map(sys.intern, dict.fromkeys(section.students))),
    )
