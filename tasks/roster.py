"""The district mirror: roster snapshots (``grassroots seed``, SPEC §5.1) and the additive roster
events that keep it current. Validation refuses a bad snapshot whole before anything is written;
writes are bulk upserts, so loading the same roster twice changes nothing the second time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models import (
    Account,
    Assignment,
    Class,
    ClassTeacher,
    District,
    Enrollment,
    Goal,
    ReportAccess,
    SkillProgress,
    utcnow,
)
from tasks.errors import GrassrootsError

Id = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
CLEVER_ROLES = {"district_admin": "admin", "teacher": "teacher", "student": "student"}


class SnapshotError(GrassrootsError):
    """The snapshot is malformed; the message names the bad record. Nothing was written."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CleverName(_Record):
    first: str | None = None
    middle: str | None = None
    last: str | None = None

    def full(self) -> str | None:
        return " ".join(p for p in (self.first, self.last) if p) or None


class CleverUser(_Record):
    id: Id
    district: Id
    email: str | None = None
    name: CleverName | None = None
    roles: dict[str, dict[str, Any] | None]

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(roles) - set(CLEVER_ROLES))
        if unknown:
            raise ValueError(
                f"unknown role {unknown[0]!r} (expected district_admin, teacher, student)"
            )
        if not roles:
            raise ValueError("a user needs at least one role")
        return roles

    @property
    def platform_roles(self) -> set[str]:
        return {CLEVER_ROLES[r] for r in self.roles}


class CleverSection(_Record):
    id: Id
    district: Id
    name: str = Field(min_length=1, max_length=500)
    teacher: Id | None = None
    teachers: list[Id] = []
    students: list[Id] = []

    @property
    def all_teachers(self) -> list[str]:
        return list(dict.fromkeys([*([self.teacher] if self.teacher else []), *self.teachers]))


class Policy(_Record):
    admin_removal: Literal["convert", "remove"] = "convert"


class DistrictRecord(_Record):
    id: Id
    name: str = Field(min_length=1, max_length=500)
    policy: Policy = Policy()


class PlatformAccount(_Record):
    id: Id
    email: str | None = None
    name: str | None = None
    roles: list[Literal["teacher", "student"]] = Field(min_length=1)


class PlatformClass(_Record):
    id: Id
    name: str = Field(min_length=1, max_length=500)
    teacher: Id
    students: list[Id] = []


class _ClassItem(_Record):
    """Something a teacher created in one class."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    id: Id
    class_id: Id = Field(alias="class")
    created_by: Id | None = None


class PlatformGoal(_ClassItem):
    course: str = Field(min_length=1, max_length=200)


class PlatformAssignment(_ClassItem):
    title: str = Field(min_length=1, max_length=500)


class Progress(_Record):
    user: Id
    skill: str = Field(min_length=1, max_length=200)
    points: int = Field(ge=0)
    mastery: Literal["attempted", "familiar", "proficient", "mastered"]


class Platform(_Record):
    accounts: list[PlatformAccount] = []
    classes: list[PlatformClass] = []
    goals: list[PlatformGoal] = []
    assignments: list[PlatformAssignment] = []
    progress: list[Progress] = []


class Snapshot(_Record):
    model_config = ConfigDict(extra="forbid", frozen=True)
    districts: list[DistrictRecord] = []
    users: list[CleverUser] = []
    sections: list[CleverSection] = []
    platform: Platform = Platform()


# --------------------------------------------------------------------------------------------
# Validation


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
        if isinstance(node, dict) and isinstance(node.get("id"), str):
            record_id = node["id"]
    return f"{path} (id {record_id})" if record_id else path


def parse_snapshot(data: Any) -> Snapshot:
    if not isinstance(data, dict):
        raise SnapshotError(
            "a roster snapshot is a JSON object with districts, users, sections, platform"
        )
    try:
        return Snapshot.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _where(data, err["loc"])
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise SnapshotError(f"{where}: {err['msg']}{more}") from None


def _duplicates(kind: str, ids: Iterable[str]) -> None:
    seen: set[str] = set()
    for i, record_id in enumerate(ids):
        if record_id in seen:
            raise SnapshotError(f"{kind}[{i}] (id {record_id}): duplicate id")
        seen.add(record_id)


def _existing(session: Session, column: Any, ids: Iterable[str]) -> set[str]:
    wanted = sorted(set(ids))
    found: set[str] = set()
    for start in range(0, len(wanted), 1000):
        found.update(
            session.scalars(select(column).where(column.in_(wanted[start : start + 1000])))
        )
    return found


def check_references(session: Session, snap: Snapshot) -> None:
    """Every id the snapshot names must be in the snapshot or already in the database."""
    _duplicates("districts", (d.id for d in snap.districts))
    _duplicates("users", (u.id for u in snap.users))
    _duplicates("sections", (s.id for s in snap.sections))
    _duplicates("platform.accounts", (a.id for a in snap.platform.accounts))
    _duplicates("platform.classes", (c.id for c in snap.platform.classes))
    _duplicates("platform.goals", (g.id for g in snap.platform.goals))
    _duplicates("platform.assignments", (a.id for a in snap.platform.assignments))

    districts = {d.id for d in snap.districts}
    districts |= _existing(
        session, District.id, {u.district for u in snap.users} | {s.district for s in snap.sections}
    )
    users = {u.id: u for u in snap.users}
    accounts = set(users) | {a.id for a in snap.platform.accounts}
    clashes = set(users) & {a.id for a in snap.platform.accounts}
    if clashes:
        raise SnapshotError(
            f"platform.accounts (id {sorted(clashes)[0]}): id already used by a user"
        )
    named: set[str] = set()
    for s in snap.sections:
        named.update(s.all_teachers, s.students)
    for c in snap.platform.classes:
        named.update([c.teacher, *c.students])
    for item in (*snap.platform.goals, *snap.platform.assignments):
        if item.created_by:
            named.add(item.created_by)
    named.update(p.user for p in snap.platform.progress)
    accounts |= _existing(session, Account.id, named - accounts)
    classes = {s.id for s in snap.sections} | {c.id for c in snap.platform.classes}
    clashes = {s.id for s in snap.sections} & {c.id for c in snap.platform.classes}
    if clashes:
        raise SnapshotError(
            f"platform.classes (id {sorted(clashes)[0]}): id already used by a section"
        )
    classes |= _existing(
        session,
        Class.id,
        {g.class_id for g in (*snap.platform.goals, *snap.platform.assignments)} - classes,
    )

    def need(ok: bool, where: str, what: str) -> None:
        if not ok:
            raise SnapshotError(f"{where}: {what}")

    for i, u in enumerate(snap.users):
        need(u.district in districts, f"users[{i}] (id {u.id})", f"unknown district {u.district}")
    for i, s in enumerate(snap.sections):
        where = f"sections[{i}] (id {s.id})"
        need(s.district in districts, where, f"unknown district {s.district}")
        need(bool(s.all_teachers), where, "a section needs a teacher")
        for t in s.all_teachers:
            need(t in accounts, where, f"unknown teacher {t}")
            if t in users:
                need("teacher" in users[t].platform_roles, where, f"user {t} is not a teacher")
                need(users[t].district == s.district, where, f"teacher {t} is in another district")
        for st in s.students:
            need(st in accounts, where, f"unknown student {st}")
            if st in users:
                need("student" in users[st].platform_roles, where, f"user {st} is not a student")
    for i, c in enumerate(snap.platform.classes):
        where = f"platform.classes[{i}] (id {c.id})"
        need(c.teacher in accounts, where, f"unknown teacher {c.teacher}")
        for st in c.students:
            need(st in accounts, where, f"unknown student {st}")
    for kind, items in (("goals", snap.platform.goals), ("assignments", snap.platform.assignments)):
        for i, item in enumerate(items):
            where = f"platform.{kind}[{i}] (id {item.id})"
            need(item.class_id in classes, where, f"unknown class {item.class_id}")
            need(
                item.created_by is None or item.created_by in accounts,
                where,
                f"unknown account {item.created_by}",
            )
    seen_progress: set[tuple[str, str]] = set()
    for i, p in enumerate(snap.platform.progress):
        where = f"platform.progress[{i}] (user {p.user}, skill {p.skill})"
        need(p.user in accounts, where, f"unknown user {p.user}")
        need((p.user, p.skill) not in seen_progress, where, "duplicate progress row")
        seen_progress.add((p.user, p.skill))


# --------------------------------------------------------------------------------------------
# Writing


def _insert(session: Session, model: Any) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model)
    if dialect == "sqlite":
        return sqlite.insert(model)
    raise GrassrootsError(f"unsupported database {dialect}")


def _bulk(session: Session, stmt: Any, rows: list[dict[str, Any]], size: int = 2000) -> None:
    for start in range(0, len(rows), size):
        session.execute(stmt, rows[start : start + size])


@dataclass
class MirrorResult:
    districts: int = 0
    users: int = 0
    sections: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {
            "districts": self.districts,
            "users": self.users,
            "sections": self.sections,
            **self.counts,
        }


def upsert_districts(session: Session, districts: Sequence[DistrictRecord]) -> None:
    now = utcnow()
    stmt = _insert(session, District)
    stmt = stmt.on_conflict_do_update(
        index_elements=[District.id],
        set_={
            "name": stmt.excluded.name,
            "admin_removal": stmt.excluded.admin_removal,
            "updated_at": now,
        },
    )
    _bulk(
        session,
        stmt,
        [
            {
                "id": d.id,
                "name": d.name,
                "admin_removal": d.policy.admin_removal,
                "status": "active",
                "created_at": now,
                "updated_at": now,
            }
            for d in districts
        ],
    )


def upsert_users(session: Session, users: Sequence[CleverUser]) -> None:
    """Create district accounts for new Clever users; for accounts still in the district, update
    names and emails and add roles they gained. A converted account is not brought back here:
    that is ``restore``'s job."""
    now = utcnow()
    stmt = _insert(session, Account)
    ex = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=[Account.id],
        set_={
            "email": ex.email,
            "name": ex.name,
            "is_admin": Account.is_admin | ex.is_admin,
            "is_teacher": Account.is_teacher | ex.is_teacher,
            "is_student": Account.is_student | ex.is_student,
            "updated_at": now,
        },
        where=(Account.kind == "district") & (Account.district_id == ex.district_id),
    )
    _bulk(
        session,
        stmt,
        [
            {
                "id": u.id,
                "clever_id": u.id,
                "email": u.email,
                "name": u.name.full() if u.name else None,
                "is_admin": "admin" in u.platform_roles,
                "is_teacher": "teacher" in u.platform_roles,
                "is_student": "student" in u.platform_roles,
                "kind": "district",
                "status": "active",
                "district_id": u.district,
                "created_at": now,
                "updated_at": now,
            }
            for u in users
        ],
    )
    admins = [u for u in users if "admin" in u.platform_roles]
    if admins:
        # Grant report access only to admins still in their (active) district.
        eligible = {
            row[0]
            for row in session.execute(
                select(Account.id)
                .join(District, District.id == Account.district_id)
                .where(
                    Account.id.in_([u.id for u in admins]),
                    Account.kind == "district",
                    Account.is_admin.is_(True),
                    District.status == "active",
                )
            )
        }
        grant = _insert(session, ReportAccess).on_conflict_do_nothing()
        _bulk(
            session,
            grant,
            [
                {
                    "account_id": u.id,
                    "district_id": u.district,
                    "created_at": now,
                    "updated_at": now,
                }
                for u in admins
                if u.id in eligible
            ],
        )


def upsert_sections(session: Session, sections: Sequence[CleverSection]) -> None:
    """Create or rename district classes and add the teachers and students they list. Links that
    a conversion removed stay removed."""
    now = utcnow()
    stmt = _insert(session, Class)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Class.id],
        set_={"name": stmt.excluded.name, "updated_at": now},
        where=Class.district_synced.is_(True),
    )
    _bulk(
        session,
        stmt,
        [
            {
                "id": s.id,
                "name": s.name,
                "district_synced": True,
                "district_id": s.district,
                "created_at": now,
                "updated_at": now,
            }
            for s in sections
        ],
    )
    _bulk(
        session,
        _insert(session, ClassTeacher).on_conflict_do_nothing(),
        [{"class_id": s.id, "teacher_id": t} for s in sections for t in s.all_teachers],
    )
    _bulk(
        session,
        _insert(session, Enrollment).on_conflict_do_nothing(),
        [
            {"class_id": s.id, "student_id": st}
            for s in sections
            for st in dict.fromkeys(s.students)
        ],
    )


def upsert_platform(session: Session, platform: Platform) -> None:
    now = utcnow()
    stmt = _insert(session, Account)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Account.id],
        set_={"email": stmt.excluded.email, "name": stmt.excluded.name, "updated_at": now},
        where=Account.kind == "grassroots",
    )
    _bulk(
        session,
        stmt,
        [
            {
                "id": a.id,
                "clever_id": None,
                "email": a.email,
                "name": a.name,
                "is_admin": False,
                "is_teacher": "teacher" in a.roles,
                "is_student": "student" in a.roles,
                "kind": "grassroots",
                "status": "active",
                "district_id": None,
                "created_at": now,
                "updated_at": now,
            }
            for a in platform.accounts
        ],
    )
    stmt = _insert(session, Class)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Class.id],
        set_={"name": stmt.excluded.name, "updated_at": now},
        where=Class.district_synced.is_(False),
    )
    _bulk(
        session,
        stmt,
        [
            {
                "id": c.id,
                "name": c.name,
                "district_synced": False,
                "district_id": None,
                "created_at": now,
                "updated_at": now,
            }
            for c in platform.classes
        ],
    )
    _bulk(
        session,
        _insert(session, ClassTeacher).on_conflict_do_nothing(),
        [{"class_id": c.id, "teacher_id": c.teacher} for c in platform.classes],
    )
    _bulk(
        session,
        _insert(session, Enrollment).on_conflict_do_nothing(),
        [
            {"class_id": c.id, "student_id": st}
            for c in platform.classes
            for st in dict.fromkeys(c.students)
        ],
    )
    items: Sequence[_ClassItem]
    for model, items, attr in (
        (Goal, platform.goals, "course"),
        (Assignment, platform.assignments, "title"),
    ):
        stmt = _insert(session, model)
        stmt = stmt.on_conflict_do_update(
            index_elements=[model.id], set_={attr: getattr(stmt.excluded, attr), "updated_at": now}
        )
        _bulk(
            session,
            stmt,
            [
                {
                    "id": i.id,
                    "class_id": i.class_id,
                    "created_by": i.created_by,
                    attr: getattr(i, attr),
                    "created_at": now,
                    "updated_at": now,
                }
                for i in items
            ],
        )
    stmt = _insert(session, SkillProgress)
    stmt = stmt.on_conflict_do_update(
        index_elements=[SkillProgress.student_id, SkillProgress.skill],
        set_={"points": stmt.excluded.points, "mastery": stmt.excluded.mastery, "updated_at": now},
    )
    _bulk(
        session,
        stmt,
        [
            {
                "student_id": p.user,
                "skill": p.skill,
                "points": p.points,
                "mastery": p.mastery,
                "created_at": now,
                "updated_at": now,
            }
            for p in platform.progress
        ],
    )


def load_snapshot(session: Session, data: Any) -> MirrorResult:
    """Validate a roster snapshot whole, then write it. Raises ``SnapshotError`` (nothing
    written) for a malformed one."""
    snap = parse_snapshot(data)
    check_references(session, snap)
    upsert_districts(session, snap.districts)
    upsert_users(session, snap.users)
    upsert_sections(session, snap.sections)
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
    )
