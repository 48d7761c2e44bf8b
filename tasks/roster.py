"""The district mirror: roster snapshots (``grassroots seed``, SPEC §5.1) and the additive roster
events that keep it current. Validation refuses a bad snapshot whole before anything is written;
writes are bulk upserts, so loading the same roster twice changes nothing the second time.
"""

from __future__ import annotations

import gc
import itertools
import operator
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import psycopg
from psycopg import sql
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import column, exists, insert, literal, select, table
from sqlalchemy.exc import IntegrityError
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
from tasks.sql import dialect_insert

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
Id = Annotated[str, Field(min_length=1, max_length=64, pattern=ID_PATTERN)]
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
        found = node.get("id") if isinstance(node, dict) else None
        # Only an id that is one: a malformed "id" may hold an email or a name.
        if isinstance(found, str) and len(found) <= 64 and re.fullmatch(ID_PATTERN, found):
            record_id = found
    return f"{path} (id {record_id})" if record_id else path


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


def parse_snapshot(data: Any) -> Snapshot:
    if not isinstance(data, dict):
        raise SnapshotError(
            "a roster snapshot is a JSON object with districts, users, sections, platform"
        )
    try:
        return Snapshot.model_validate(data)
    except ValidationError as exc:
        problems = _Problems()
        # pydantic's messages name what was expected, never the input (personal data).
        for err in exc.errors(include_input=False, include_url=False):
            problems.add(f"{_where(data, err['loc'])}: {err['msg']}")
        raise problems.error() from None


def _duplicates(problems: _Problems, kind: str, ids: Iterable[str]) -> None:
    seen: set[str] = set()
    for i, record_id in enumerate(ids):
        if record_id in seen:
            problems.add(f"{kind}[{i}] (id {record_id}): duplicate id")
        seen.add(record_id)


def _existing(session: Session, column: Any, ids: Iterable[str], *where: Any) -> set[str]:
    """The ids found in ``column`` (of rows that also meet ``where``)."""
    wanted = sorted(set(ids))
    found: set[str] = set()
    for start in range(0, len(wanted), 1000):
        found.update(
            session.scalars(select(column).where(column.in_(wanted[start : start + 1000]), *where))
        )
    return found


def check_references(session: Session, snap: Snapshot) -> None:
    """Every id the snapshot names must be in the snapshot or already in the database. Raises
    one ``SnapshotError`` naming every problem (up to ``MAX_PROBLEMS``, then their number)."""
    problems = _Problems()
    _duplicates(problems, "districts", (d.id for d in snap.districts))
    _duplicates(problems, "users", (u.id for u in snap.users))
    _duplicates(problems, "sections", (s.id for s in snap.sections))
    _duplicates(problems, "platform.accounts", (a.id for a in snap.platform.accounts))
    _duplicates(problems, "platform.classes", (c.id for c in snap.platform.classes))
    _duplicates(problems, "platform.goals", (g.id for g in snap.platform.goals))
    _duplicates(problems, "platform.assignments", (a.id for a in snap.platform.assignments))

    districts = {d.id for d in snap.districts}
    districts |= _existing(
        session, District.id, {u.district for u in snap.users} | {s.district for s in snap.sections}
    )
    users = {u.id: u for u in snap.users}
    accounts = set(users) | {a.id for a in snap.platform.accounts}
    clashes = set(users) & {a.id for a in snap.platform.accounts}
    for i, a in enumerate(snap.platform.accounts if clashes else ()):
        if a.id in clashes:
            problems.add(f"platform.accounts[{i}] (id {a.id}): id already used by a user")
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
    for i, c in enumerate(snap.platform.classes if clashes else ()):
        if c.id in clashes:
            problems.add(f"platform.classes[{i}] (id {c.id}): id already used by a section")
    classes |= _existing(
        session,
        Class.id,
        {g.class_id for g in (*snap.platform.goals, *snap.platform.assignments)} - classes,
    )

    # A 100k-student district has a million links to check: the per-link loops only run to name
    # the bad records once a whole-list set operation has found one.
    for i, u in enumerate(snap.users):
        if u.district not in districts:
            problems.add(f"users[{i}] (id {u.id}): unknown district {u.district}")
    teachers = {u for u, user in users.items() if "teacher" in user.roles}
    not_students = {u for u, user in users.items() if "student" not in user.roles}
    for i, s in enumerate(snap.sections):
        where = f"sections[{i}] (id {s.id})"
        if s.district not in districts:
            problems.add(f"{where}: unknown district {s.district}")
        if not s.all_teachers:
            problems.add(f"{where}: a section needs a teacher")
        for t in s.all_teachers:
            if t not in accounts:
                problems.add(f"{where}: unknown teacher {t}")
            elif t in users:
                if t not in teachers:
                    problems.add(f"{where}: user {t} is not a teacher")
                elif users[t].district != s.district:
                    problems.add(f"{where}: teacher {t} is in another district")
        if accounts.issuperset(s.students) and not_students.isdisjoint(s.students):
            continue
        for st in s.students:
            if st not in accounts:
                problems.add(f"{where}: unknown student {st}")
            elif st in not_students:
                problems.add(f"{where}: user {st} is not a student")
    for i, c in enumerate(snap.platform.classes):
        where = f"platform.classes[{i}] (id {c.id})"
        if c.teacher not in accounts:
            problems.add(f"{where}: unknown teacher {c.teacher}")
        if accounts.issuperset(c.students):
            continue
        for st in c.students:
            if st not in accounts:
                problems.add(f"{where}: unknown student {st}")
    for kind, items in (("goals", snap.platform.goals), ("assignments", snap.platform.assignments)):
        for i, item in enumerate(items):
            where = f"platform.{kind}[{i}] (id {item.id})"
            if item.class_id not in classes:
                problems.add(f"{where}: unknown class {item.class_id}")
            if item.created_by is not None and item.created_by not in accounts:
                problems.add(f"{where}: unknown account {item.created_by}")
    progress = snap.platform.progress
    if not accounts.issuperset(p.user for p in progress) or len(
        {(p.user, p.skill) for p in progress}
    ) < len(progress):
        seen_progress: set[tuple[str, str]] = set()
        for i, p in enumerate(progress):
            where = f"platform.progress[{i}] (user {p.user}, skill {p.skill})"
            if p.user not in accounts:
                problems.add(f"{where}: unknown user {p.user}")
            if (p.user, p.skill) in seen_progress:
                problems.add(f"{where}: duplicate progress row")
            seen_progress.add((p.user, p.skill))
    problems.raise_any()


# --------------------------------------------------------------------------------------------
# Writing


# Below this many rows an executemany is cheapest (a roster event upserts one user or section).
# From it on, Postgres gets COPY into a temporary table and one INSERT … SELECT.
COPY_MIN_ROWS = 1000
# Rows per executemany: bounds the memory of one parameter list.
EXECUTEMANY_CHUNK = 5000


def _bulk(
    session: Session,
    stmt: Any,
    rows: Iterable[dict[str, Any]],
    shared: dict[str, Any] | None = None,
) -> None:
    """Run ``stmt``, one table's INSERT … ON CONFLICT, for every row.

    Every row has the same keys, and no two rows the same conflict key (validation sees to it).
    ``shared`` holds the values every row takes (timestamps, kinds): bound once, not per row.
    """
    shared = shared or {}
    rest = iter(rows)
    chunk = list(itertools.islice(rest, max(COPY_MIN_ROWS, 1)))
    if chunk and len(chunk) >= COPY_MIN_ROWS and session.get_bind().dialect.name == "postgresql":
        _copy_upsert(session, stmt, itertools.chain(chunk, rest), list(chunk[0]), shared)
        return
    # A Core executemany: the ORM's bulk INSERT path costs a third more CPU per row. Flush
    # first, as ``session.execute`` would.
    session.flush()
    connection = session.connection()
    while chunk:
        connection.execute(stmt, [row | shared for row in chunk])
        chunk = list(itertools.islice(rest, EXECUTEMANY_CHUNK))


def _copy_upsert(
    session: Session,
    stmt: Any,
    rows: Iterable[dict[str, Any]],
    names: list[str],
    shared: dict[str, Any],
) -> None:
    """Postgres: COPY the rows into a temporary table shaped like the target, then insert them
    from it with two set-based statements.

    An executemany runs the INSERT once per row, each with its own parameters to bind and send:
    that was most of the time a 100k-student district took to seed. COPY streams the rows. The
    rows whose key is already in the table then go through ``stmt``, its ON CONFLICT clause
    unchanged; the new ones through a plain INSERT, which skips the speculative insertion ON
    CONFLICT pays per row (a third of the server's time on a first seed). Should the plain INSERT
    meet a key after all (another transaction inserted it meanwhile), it is rolled back to its
    savepoint and ``stmt`` runs for every row, as it always did.
    """
    target = stmt.table
    temp = f"seed_{target.name}"
    columns = sql.SQL(", ").join(map(sql.Identifier, names))
    # One COPY row per dict, in ``names`` order (itemgetter of one key gives no tuple).
    pick = operator.itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)
    # The session's own connection, so the COPY is part of the seed's transaction.
    dbapi = session.connection().connection.driver_connection
    if not isinstance(dbapi, psycopg.Connection):
        raise GrassrootsError("seeding Postgres needs the psycopg driver")
    with dbapi.cursor() as cursor:
        cursor.execute(
            sql.SQL(
                "CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT {} FROM {} WITH NO DATA"
            ).format(sql.Identifier(temp), columns, sql.Identifier(target.name))
        )
        with cursor.copy(
            sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(temp), columns)
        ) as copy:
            for row in rows:
                copy.write_row(pick(row))
        source = table(temp, *(column(name) for name in names))
        constants = [literal(value, target.c[key].type).label(key) for key, value in shared.items()]
        into = [*names, *shared]
        source_rows = select(*source.c, *constants)
        present = exists().where(*(key == source.c[key.name] for key in target.primary_key))
        session.execute(stmt.from_select(into, source_rows.where(present)))
        try:
            with session.begin_nested():
                session.execute(insert(target).from_select(into, source_rows.where(~present)))
        except IntegrityError as exc:
            if not isinstance(exc.orig, psycopg.errors.UniqueViolation):
                raise
            session.execute(stmt.from_select(into, source_rows))
        cursor.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(temp)))


@dataclass
class MirrorResult:
    districts: int = 0
    users: int = 0
    sections: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    # Users and sections of districts that have exited the program, not loaded.
    left_out: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        return {
            "districts": self.districts,
            "users": self.users,
            "sections": self.sections,
            **self.counts,
        }


def upsert_districts(session: Session, districts: Sequence[DistrictRecord]) -> None:
    now = utcnow()
    stmt = dialect_insert(session, District)
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
        (
            {
                "id": d.id,
                "name": d.name,
                "admin_removal": d.policy.admin_removal,
            }
            for d in districts
        ),
        shared={"status": "active", "created_at": now, "updated_at": now},
    )


def upsert_users(session: Session, users: Sequence[CleverUser]) -> None:
    """Create district accounts for new Clever users; for accounts still in the district, update
    names and emails and add roles they gained. A converted account is not brought back here:
    that is ``restore``'s job."""
    now = utcnow()
    stmt = dialect_insert(session, Account)
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
        (
            {
                "id": u.id,
                "clever_id": u.id,
                "email": u.email,
                "name": u.name.full() if u.name else None,
                "is_admin": "district_admin" in u.roles,
                "is_teacher": "teacher" in u.roles,
                "is_student": "student" in u.roles,
                "district_id": u.district,
            }
            for u in users
        ),
        shared={"kind": "district", "status": "active", "created_at": now, "updated_at": now},
    )
    admins = [u for u in users if "district_admin" in u.roles]
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
        grant = dialect_insert(session, ReportAccess).on_conflict_do_nothing()
        _bulk(
            session,
            grant,
            ({"account_id": u.id, "district_id": u.district} for u in admins if u.id in eligible),
            shared={"created_at": now, "updated_at": now},
        )


def upsert_sections(session: Session, sections: Sequence[CleverSection]) -> None:
    """Create or rename district classes and add the teachers and students they list. Links that
    a conversion removed stay removed."""
    now = utcnow()
    stmt = dialect_insert(session, Class)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Class.id],
        set_={"name": stmt.excluded.name, "updated_at": now},
        where=Class.district_synced.is_(True),
    )
    _bulk(
        session,
        stmt,
        ({"id": s.id, "name": s.name, "district_id": s.district} for s in sections),
        shared={"district_synced": True, "created_at": now, "updated_at": now},
    )
    _bulk(
        session,
        dialect_insert(session, ClassTeacher).on_conflict_do_nothing(),
        ({"class_id": s.id, "teacher_id": t} for s in sections for t in s.all_teachers),
    )
    _bulk(
        session,
        dialect_insert(session, Enrollment).on_conflict_do_nothing(),
        (
            {"class_id": s.id, "student_id": st}
            for s in sections
            for st in dict.fromkeys(s.students)
        ),
    )


def upsert_platform(session: Session, platform: Platform) -> None:
    now = utcnow()
    stmt = dialect_insert(session, Account)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Account.id],
        set_={"email": stmt.excluded.email, "name": stmt.excluded.name, "updated_at": now},
        where=Account.kind == "grassroots",
    )
    _bulk(
        session,
        stmt,
        (
            {
                "id": a.id,
                "email": a.email,
                "name": a.name,
                "is_teacher": "teacher" in a.roles,
                "is_student": "student" in a.roles,
            }
            for a in platform.accounts
        ),
        shared={
            "clever_id": None,
            "is_admin": False,
            "kind": "grassroots",
            "status": "active",
            "district_id": None,
            "created_at": now,
            "updated_at": now,
        },
    )
    stmt = dialect_insert(session, Class)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Class.id],
        set_={"name": stmt.excluded.name, "updated_at": now},
        where=Class.district_synced.is_(False),
    )
    _bulk(
        session,
        stmt,
        ({"id": c.id, "name": c.name} for c in platform.classes),
        shared={
            "district_synced": False,
            "district_id": None,
            "created_at": now,
            "updated_at": now,
        },
    )
    _bulk(
        session,
        dialect_insert(session, ClassTeacher).on_conflict_do_nothing(),
        ({"class_id": c.id, "teacher_id": c.teacher} for c in platform.classes),
    )
    _bulk(
        session,
        dialect_insert(session, Enrollment).on_conflict_do_nothing(),
        (
            {"class_id": c.id, "student_id": st}
            for c in platform.classes
            for st in dict.fromkeys(c.students)
        ),
    )
    items: Sequence[_ClassItem]
    for model, items, attr in (
        (Goal, platform.goals, "course"),
        (Assignment, platform.assignments, "title"),
    ):
        stmt = dialect_insert(session, model)
        stmt = stmt.on_conflict_do_update(
            index_elements=[model.id], set_={attr: getattr(stmt.excluded, attr), "updated_at": now}
        )
        _bulk(
            session,
            stmt,
            (
                {
                    "id": i.id,
                    "class_id": i.class_id,
                    "created_by": i.created_by,
                    attr: getattr(i, attr),
                }
                for i in items
            ),
            shared={"created_at": now, "updated_at": now},
        )
    stmt = dialect_insert(session, SkillProgress)
    stmt = stmt.on_conflict_do_update(
        index_elements=[SkillProgress.student_id, SkillProgress.skill],
        set_={"points": stmt.excluded.points, "mastery": stmt.excluded.mastery, "updated_at": now},
    )
    _bulk(
        session,
        stmt,
        (
            {
                "student_id": p.user,
                "skill": p.skill,
                "points": p.points,
                "mastery": p.mastery,
            }
            for p in platform.progress
        ),
        shared={"created_at": now, "updated_at": now},
    )


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector.

    Loading a 100k-student snapshot allocates millions of objects (records, rows), none of them
    in reference cycles. The collector kept re-scanning them all: two thirds of the validation
    time. Reference counting still frees everything; cycles wait for the next collection.
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
                District.id.in_({d.id for d in snap.districts}), District.status == "exited"
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
    converted = _existing(
        session,
        Account.id,
        {p for sec in sections for p in (*sec.all_teachers, *sec.students)},
        Account.kind == "grassroots",
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


def load_snapshot(session: Session, data: Any) -> MirrorResult:
    """Validate a roster snapshot whole, then write it. Raises ``SnapshotError`` (nothing
    written) for a malformed one. The users and sections of a district that has exited are left
    out (``MirrorResult.left_out``), as are converted accounts from district classes."""
    with _collector_paused():
        snap, left_out = _without_exited(session, parse_snapshot(data))
        check_references(session, snap)
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
