"""Writing the district mirror: bulk upserts of districts, Clever users (their mirror rows, and
the accounts of those holding a platform role) and sections, and the platform's own records, for
a roster snapshot, a roster sync and the roster events. Loading the same records twice changes
nothing the second time.
"""

from __future__ import annotations

import itertools
import json
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import (
    JSON,
    Text,
    cast,
    column,
    delete,
    exists,
    insert,
    literal,
    select,
    table,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import (
    Account,
    AccountKind,
    AccountStatus,
    Assignment,
    Class,
    ClassTeacher,
    CleverRole,
    District,
    DistrictStatus,
    Enrollment,
    Goal,
    ReportAccess,
    Role,
    RosterUser,
    SkillProgress,
    utcnow,
)
from tasks.conversion import give_back_regained
from tasks.roster.shapes import (
    ClassItem,
    CleverSection,
    CleverUser,
    DistrictRecord,
    Platform,
    PlatformAccount,
    PlatformClass,
    Progress,
)
from tasks.sql import chunks, copy_rows, dialect_insert, execute_dml, in_ids

# Below this many rows an executemany (a roster event upserts one user or section). From it on,
# Postgres gets a COPY upsert, whose five statements (a temporary table made, filled, inserted
# from twice, dropped) are a fixed cost only a bulk load repays: hence a higher threshold than a
# plain COPY insert's, one statement (tasks.sql.COPY_INSERT_MIN_ROWS).
COPY_UPSERT_MIN_ROWS = 1000
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
    chunk = list(itertools.islice(rest, max(COPY_UPSERT_MIN_ROWS, 1)))
    if (
        chunk
        and len(chunk) >= COPY_UPSERT_MIN_ROWS
        and session.get_bind().dialect.name == "postgresql"
    ):
        _copy_upsert(session, stmt, itertools.chain(chunk, rest), list(chunk[0]), shared)
        return
    # A Core executemany: the ORM's bulk INSERT path costs more CPU per row. Flush first, as
    # ``session.execute`` would.
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

    An executemany runs the INSERT once per row, each with its own parameters to bind and send;
    COPY streams the rows. The rows whose key is already in the table then go through ``stmt``,
    its ON CONFLICT clause unchanged; the new ones through a plain INSERT, which skips the
    speculative insertion ON CONFLICT pays per row. Should the plain INSERT meet a key after all
    (another transaction inserted it meanwhile), it is rolled back to its savepoint and ``stmt``
    runs for every row, as it always did.
    """
    target = stmt.table
    temp = f"seed_{target.name}"
    quote = session.get_bind().dialect.identifier_preparer.quote
    session.execute(
        text(
            f"CREATE TEMPORARY TABLE {quote(temp)} ON COMMIT DROP"
            f" AS SELECT {', '.join(map(quote, names))} FROM {quote(target.name)} WITH NO DATA"
        )
    )
    copy_rows(session, temp, names, map(_copy_row(session, target, names), rows))
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
    # Dropped now, not at commit: the same table may be upserted again in this transaction.
    session.execute(text(f"DROP TABLE {quote(temp)}"))


def _copy_row(session: Session, target: Any, names: list[str]) -> Callable[[Any], Sequence[Any]]:
    """One COPY row per dict, in ``names`` order. psycopg writes every value as it is, but a
    JSON column's (a list would become a Postgres array): that one goes as its JSON text, which
    Postgres parses, as the executemany path's bound parameter would be. SQLAlchemy's own bind
    processors are left out: a Boolean's checks every row for nothing."""
    dumps = getattr(session.get_bind().dialect, "_json_serializer", None) or json.dumps
    # Per column: None if not JSON, else whether a None is SQL NULL (else JSON null), as bound.
    as_json = [
        type_.none_as_null if isinstance(type_ := target.c[name].type, JSON) else None
        for name in names
    ]
    # itemgetter of one key gives no tuple.
    pick = operator.itemgetter(*names) if len(names) > 1 else lambda row: (row[names[0]],)
    if all(j is None for j in as_json):
        return pick
    return lambda row: [
        value if null is None or (null and value is None) else dumps(value)
        for value, null in zip(pick(row), as_json, strict=True)
    ]


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

    def describe(self) -> str:
        """What was loaded, in the words ``seed`` and ``demo`` both print."""
        said = ", ".join(f"{v} {k}" for k, v in self.as_dict().items())
        if any(self.left_out.values()):
            said += "; left out, their district having exited: " + ", ".join(
                f"{v} {k}" for k, v in self.left_out.items()
            )
        return said


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
        shared={"status": DistrictStatus.ACTIVE, "created_at": now, "updated_at": now},
    )


def upsert_users(session: Session, users: Sequence[CleverUser]) -> None:
    """The roster lists these Clever users, as they are now (any of Clever's roles). Every one
    gets its mirror row (``upsert_roster_users``); those holding a platform role also their
    district account (``upsert_accounts``). The users' districts must exist."""
    upsert_roster_users(session, users)
    upsert_accounts(session, users)


def upsert_roster_users(session: Session, users: Sequence[CleverUser]) -> None:
    """Write the mirror rows of Clever users, whatever their roles: who the district's roster
    lists, with which of Clever's roles. Only ids and roles: names and emails are the accounts'.
    The users' districts must exist."""
    now = utcnow()
    stmt = dialect_insert(session, RosterUser)
    ex = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=[RosterUser.id],
        set_={"district_id": ex.district_id, "roles": ex.roles, "updated_at": now},
        # Only rows that changed: a roster loaded again rewrites nothing, and ``updated_at``
        # says when the roster last changed the user. Compared as text: Postgres' json has no
        # equality, and both sides are serialised alike.
        where=(RosterUser.district_id != ex.district_id)
        | (cast(RosterUser.roles, Text) != cast(ex.roles, Text)),
    )
    _bulk(
        session,
        stmt,
        ({"id": u.id, "district_id": u.district, "roles": u.clever_roles} for u in users),
        shared={"updated_at": now},
    )


def delete_roster_users(session: Session, user_ids: Iterable[str]) -> dict[str, list[str]]:
    """Remove the mirror rows of users the roster no longer lists, and return the Clever roles
    each removed row held, by user id (ids without a row are left out). Accounts are not
    touched: converting them is the rules' job (``tasks.conversion``)."""
    removed: dict[str, list[str]] = {}
    for chunk in chunks(sorted(set(user_ids))):
        gone = execute_dml(
            session,
            delete(RosterUser)
            .where(in_ids(RosterUser.id, chunk))
            .returning(RosterUser.id, RosterUser.roles),
        )
        removed.update(gone.tuples().all())
    return removed


def upsert_accounts(session: Session, users: Sequence[CleverUser]) -> None:
    """Create district accounts for new Clever users holding a platform role (the others have
    none); for accounts still in the district, update names and emails and add roles they gained.
    A converted account is not brought back here: that is ``restore``'s job. Their mirror rows
    are ``upsert_roster_users``'s."""
    users = [u for u in users if u.holds_platform_role]
    if not users:
        return
    now = utcnow()
    # Bound once: looking up an enum member costs more than the dict test it is used in.
    admin, teacher, student = CleverRole.DISTRICT_ADMIN, CleverRole.TEACHER, CleverRole.STUDENT
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
        where=(Account.kind == AccountKind.DISTRICT) & (Account.district_id == ex.district_id),
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
                "is_admin": admin in u.roles,
                "is_teacher": teacher in u.roles,
                "is_student": student in u.roles,
                "district_id": u.district,
            }
            for u in users
        ),
        shared={
            "kind": AccountKind.DISTRICT,
            "status": AccountStatus.ACTIVE,
            "created_at": now,
            "updated_at": now,
        },
    )
    admins = [u for u in users if admin in u.roles]
    if admins:
        _grant_reports(session, admins, now)


def _grant_reports(session: Session, admins: Sequence[CleverUser], now: datetime) -> None:
    """Grant report access only to admins still in their (active) district.

    A grant a role loss revoked comes back live with the role (SPEC §5.1: a role the roster lists
    again is given back whole): the role flag and the grant are one thing to a reader, and an
    admin that cannot open reports is the contradiction this prevents. Seed, sync and events all
    add roles through here."""
    eligible = {
        row[0]
        for row in session.execute(
            select(Account.id)
            .join(District, District.id == Account.district_id)
            .where(
                Account.id.in_([u.id for u in admins]),
                Account.kind == AccountKind.DISTRICT,
                Account.is_admin.is_(True),
                District.status == DistrictStatus.ACTIVE,
            )
        )
    }
    grant = dialect_insert(session, ReportAccess)
    grant = grant.on_conflict_do_update(
        index_elements=[ReportAccess.account_id, ReportAccess.district_id],
        set_={"removed_by": None, "updated_at": now},
        where=ReportAccess.removed_by.is_not(None),
    )
    _bulk(
        session,
        grant,
        ({"account_id": u.id, "district_id": u.district} for u in admins if u.id in eligible),
        shared={"created_at": now, "updated_at": now},
    )


def upsert_sections(session: Session, sections: Sequence[CleverSection]) -> None:
    """Create or rename district classes and add the teachers and students they list. Links that
    a conversion removed stay removed, but for those its member's own role loss removed, which
    come back with the role (``give_back_regained``)."""
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
    give_back_regained(
        session,
        teachers=((s.id, t) for s in sections for t in s.all_teachers),
        students=((s.id, st) for s in sections for st in s.students),
        now=now,
    )


def upsert_platform(session: Session, platform: Platform) -> None:
    """Create or update the platform's own records of a snapshot: grassroots accounts,
    independent classes, goals, assignments and skill progress."""
    now = utcnow()
    _upsert_platform_accounts(session, platform.accounts, now)
    _upsert_platform_classes(session, platform.classes, now)
    _upsert_class_items(session, Goal, platform.goals, "course", now)
    _upsert_class_items(session, Assignment, platform.assignments, "title", now)
    _upsert_progress(session, platform.progress, now)


def _upsert_platform_accounts(
    session: Session, accounts: Sequence[PlatformAccount], now: datetime
) -> None:
    teacher, student = Role.TEACHER, Role.STUDENT  # bound once, as in upsert_users
    stmt = dialect_insert(session, Account)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Account.id],
        set_={"email": stmt.excluded.email, "name": stmt.excluded.name, "updated_at": now},
        where=Account.kind == AccountKind.GRASSROOTS,
    )
    _bulk(
        session,
        stmt,
        (
            {
                "id": a.id,
                "email": a.email,
                "name": a.name,
                "is_teacher": teacher in a.roles,
                "is_student": student in a.roles,
            }
            for a in accounts
        ),
        shared={
            "clever_id": None,
            "is_admin": False,
            "kind": AccountKind.GRASSROOTS,
            "status": AccountStatus.ACTIVE,
            "district_id": None,
            "created_at": now,
            "updated_at": now,
        },
    )


def _upsert_platform_classes(
    session: Session, classes: Sequence[PlatformClass], now: datetime
) -> None:
    stmt = dialect_insert(session, Class)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Class.id],
        set_={"name": stmt.excluded.name, "updated_at": now},
        where=Class.district_synced.is_(False),
    )
    _bulk(
        session,
        stmt,
        ({"id": c.id, "name": c.name} for c in classes),
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
        ({"class_id": c.id, "teacher_id": c.teacher} for c in classes),
    )
    _bulk(
        session,
        dialect_insert(session, Enrollment).on_conflict_do_nothing(),
        ({"class_id": c.id, "student_id": st} for c in classes for st in dict.fromkeys(c.students)),
    )


def _upsert_class_items(
    session: Session, model: Any, items: Sequence[ClassItem], attr: str, now: datetime
) -> None:
    """Goals (``attr`` "course") or assignments (``attr`` "title")."""
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


def _upsert_progress(session: Session, progress: Sequence[Progress], now: datetime) -> None:
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
            for p in progress
        ),
        shared={"created_at": now, "updated_at": now},
    )
