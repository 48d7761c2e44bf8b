"""Hypothesis strategies: small generated rosters (SPEC §5.1 snapshots) and sequences of the
operations that change them (the conversion rules of SPEC §3, and restore)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hypothesis import strategies as st

SKILLS = ("add-fractions", "decimals-intro", "place-value", "ratios-intro")
MASTERY = ("attempted", "familiar", "proficient", "mastered")
PLATFORM_ROLES = ("admin", "teacher", "student")
CLEVER_ROLES = {"district_admin": "admin", "teacher": "teacher", "student": "student"}

OpKind = Literal["convert", "lose_roles", "drop_class", "shrink_section", "exit", "restore"]


# --------------------------------------------------------------------------------------------
# Rosters


@dataclass(frozen=True)
class ClassInfo:
    teachers: tuple[str, ...]
    students: tuple[str, ...]
    district: str | None  # None: an independent class


@dataclass(frozen=True)
class Roster:
    """A snapshot, and what a test needs to aim operations at it."""

    snapshot: dict[str, Any] = field(repr=False)
    districts: dict[str, str]  # id -> admin_removal policy
    roles: dict[str, frozenset[str]]  # account id -> platform roles, in snapshot order
    home: dict[str, str | None]  # account id -> district (None: grassroots-only)
    classes: dict[str, ClassInfo]

    @classmethod
    def of(cls, snapshot: dict[str, Any]) -> Roster:
        platform = snapshot.get("platform", {})
        roles: dict[str, frozenset[str]] = {}
        home: dict[str, str | None] = {}
        for user in snapshot.get("users", []):
            roles[user["id"]] = frozenset(CLEVER_ROLES[r] for r in user["roles"])
            home[user["id"]] = user["district"]
        for account in platform.get("accounts", []):
            roles[account["id"]] = frozenset(account["roles"])
            home[account["id"]] = None
        classes = {
            s["id"]: ClassInfo(
                tuple(dict.fromkeys([s["teacher"], *s.get("teachers", [])])),
                tuple(s.get("students", [])),
                s["district"],
            )
            for s in snapshot.get("sections", [])
        }
        for c in platform.get("classes", []):
            classes[c["id"]] = ClassInfo((c["teacher"],), tuple(c.get("students", [])), None)
        districts = {d["id"]: d["policy"]["admin_removal"] for d in snapshot["districts"]}
        return cls(snapshot, districts, roles, home, classes)

    @property
    def accounts(self) -> list[str]:
        """Admins, teachers, students, then grassroots accounts: what shrinks first comes first."""
        return list(self.roles)

    @property
    def district_accounts(self) -> list[str]:
        return [a for a, d in self.home.items() if d is not None]

    @property
    def progress_rows(self) -> int:
        return len(self.snapshot.get("platform", {}).get("progress", []))

    def related(self, target: str) -> set[str]:
        """The ids an operation on ``target`` bears on: a class and its members, or the classes
        of an account and everyone in them."""
        if target in self.classes:
            info = self.classes[target]
            return {target, *info.teachers, *info.students}
        related = {target}
        for class_id, info in self.classes.items():
            if target in info.teachers or target in info.students:
                related |= {class_id, *info.teachers, *info.students}
        return related


def user(user_id: str, district: str, *clever_roles: str) -> dict[str, Any]:
    """A Clever v3 User object."""
    return {
        "id": user_id,
        "district": district,
        "email": f"{user_id}@example.org",
        "name": {"first": "User", "middle": None, "last": user_id},
        "roles": {role: {} for role in clever_roles},
    }


def section(
    section_id: str, district: str, teachers: Sequence[str], students: Sequence[str]
) -> dict[str, Any]:
    """A Clever v3 Section object; the first teacher is the lead."""
    return {
        "id": section_id,
        "district": district,
        "name": f"Section {section_id}",
        "teacher": teachers[0],
        "teachers": list(teachers),
        "students": list(students),
    }


def snapshot(
    districts: dict[str, str],
    users: list[dict[str, Any]],
    sections: list[dict[str, Any]],
    **platform: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "districts": [
            {"id": did, "name": f"District {did}", "policy": {"admin_removal": policy}}
            for did, policy in districts.items()
        ],
        "users": users,
        "sections": sections,
        "platform": {
            key: platform.get(key, [])
            for key in ("accounts", "classes", "goals", "assignments", "progress")
        },
    }


def _subset(
    draw: st.DrawFn, items: Sequence[str], *, min_size: int = 0, max_size: int = 4
) -> list[str]:
    if not items:
        return []
    chosen: list[str] = draw(
        st.lists(
            st.sampled_from(items),
            min_size=min(min_size, len(items)),
            max_size=min(max_size, len(items)),
            unique=True,
        )
    )
    return sorted(chosen)


def _district(
    draw: st.DrawFn, d: int, users: list[dict[str, Any]], sections: list[dict[str, Any]]
) -> tuple[str, list[str], list[str]]:
    """District ``d``: its policy, its users and sections appended to ``users`` and ``sections``;
    returns the policy, its teachers and its students."""
    did = f"dist{d}"
    policy = draw(st.sampled_from(["convert", "remove"]))
    local_teachers: list[str] = []
    local_students: list[str] = []
    for a in range(draw(st.integers(0, 2))):
        also_teacher = draw(st.booleans())
        users.append(user(f"d{d}-admin{a}", did, "district_admin", *["teacher"] * also_teacher))
        if also_teacher:
            local_teachers.append(f"d{d}-admin{a}")
    for t in range(draw(st.integers(1, 2))):
        users.append(user(f"d{d}-teacher{t}", did, "teacher"))
        local_teachers.append(f"d{d}-teacher{t}")
    for s in range(draw(st.integers(1, 2))):
        users.append(user(f"d{d}-student{s}", did, "student"))
        local_students.append(f"d{d}-student{s}")
    for s in range(draw(st.integers(0, 3))):
        taught_by = _subset(draw, local_teachers, min_size=1, max_size=2)
        lead = draw(st.sampled_from(taught_by))
        taught_by = [lead, *(t for t in taught_by if t != lead)]
        enrolled = _subset(draw, local_students, min_size=1)
        sections.append(section(f"d{d}-sec{s}", did, taught_by, enrolled))
    return policy, local_teachers, local_students


def _grassroots_accounts(
    draw: st.DrawFn, teachers: list[str], students: list[str]
) -> list[dict[str, Any]]:
    """0–2 grassroots-only accounts, each added to ``teachers`` and ``students`` by its roles."""
    accounts: list[dict[str, Any]] = []
    for g in range(draw(st.integers(0, 2))):
        account_roles = draw(st.sampled_from([["teacher"], ["student"], ["student", "teacher"]]))
        accounts.append(
            {
                "id": f"acct-{g}",
                "email": f"acct-{g}@example.com",
                "name": f"Grassroots {g}",
                "roles": account_roles,
            }
        )
        teachers += [f"acct-{g}"] * ("teacher" in account_roles)
        students += [f"acct-{g}"] * ("student" in account_roles)
    return accounts


def _goals_and_assignments(
    draw: st.DrawFn, teachers_of: dict[str, list[str]]
) -> dict[str, list[dict[str, Any]]]:
    """Up to 4 goals and 4 assignments in the classes, each created by one of its teachers."""
    items: dict[str, list[dict[str, Any]]] = {"goals": [], "assignments": []}
    for kind, prefix, attr in (("goals", "goal", "course"), ("assignments", "asg", "title")):
        for i in range(draw(st.integers(0, 4)) if teachers_of else 0):
            class_id = draw(st.sampled_from(sorted(teachers_of)))
            items[kind].append(
                {
                    "id": f"{prefix}-{i}",
                    "class": class_id,
                    "created_by": draw(st.sampled_from(teachers_of[class_id])),
                    attr: f"{prefix} {i}",
                }
            )
    return items


@st.composite
def rosters(draw: st.DrawFn) -> Roster:
    """1–2 districts (policy convert or remove), each with admins (some also teachers),
    teachers and students, and sections with co-teachers; grassroots-only accounts; independent
    classes taught by district or grassroots teachers; goals and assignments in both kinds of
    class; skill progress."""
    districts: dict[str, str] = {}
    users: list[dict[str, Any]] = []
    sections: list[dict[str, Any]] = []
    teachers: list[str] = []
    students: list[str] = []

    for d in range(draw(st.integers(1, 2))):
        districts[f"dist{d}"], local_teachers, local_students = _district(draw, d, users, sections)
        teachers += local_teachers
        students += local_students

    accounts = _grassroots_accounts(draw, teachers, students)

    independent: list[dict[str, Any]] = []
    for c in range(draw(st.integers(0, 2))):
        teacher = draw(st.sampled_from(teachers))
        enrolled = [s for s in _subset(draw, students) if s != teacher]
        independent.append(
            {"id": f"club-{c}", "name": f"Club {c}", "teacher": teacher, "students": enrolled}
        )

    teachers_of: dict[str, list[str]] = {s["id"]: s["teachers"] for s in sections}
    teachers_of |= {c["id"]: [c["teacher"]] for c in independent}
    items = _goals_and_assignments(draw, teachers_of)

    progress = [
        {
            "user": student,
            "skill": skill,
            "points": draw(st.integers(0, 500)),
            "mastery": draw(st.sampled_from(MASTERY)),
        }
        for student in students
        for skill in _subset(draw, SKILLS, max_size=2)
    ]
    return Roster.of(
        snapshot(
            districts,
            users,
            sections,
            accounts=accounts,
            classes=independent,
            progress=progress,
            **items,
        )
    )


# --------------------------------------------------------------------------------------------
# Operations


@dataclass(frozen=True)
class Op:
    """One operation; ``target`` is an account, class or district id."""

    kind: OpKind
    target: str
    roles: tuple[str, ...] = ()
    students: tuple[str, ...] = ()
    teachers: tuple[str, ...] = ()


CONVERSIONS: tuple[OpKind, ...] = ("convert", "lose_roles", "exit", "drop_class", "shrink_section")

# An operation's random material: its kind (an index into the example's conversion kinds; a
# restore ignores it), whether to aim at the example's focus (0–2: yes), which target, and a bit
# mask choosing roles or members. Drawn as plain lists, so Hypothesis can delete operations while
# shrinking; ``build_operation`` reads a seed against the roster and the operations before it.
Seed = tuple[int, int, int, int]
SEEDS = st.tuples(st.integers(0, 4), st.integers(0, 3), st.integers(0, 9999), st.integers(0, 255))


@dataclass(frozen=True)
class Plan:
    """How an example's operations are drawn: the conversion kinds it uses (swarm testing: a few
    kinds per example make their interactions likely) and the ids most operations aim at (a class
    and its members, or an account and everyone it shares a class with)."""

    kinds: tuple[OpKind, ...]
    focus: frozenset[str]


@st.composite
def plans(draw: st.DrawFn, roster: Roster) -> Plan:
    enabled = [kind for kind in CONVERSIONS[1:] if draw(st.booleans())]
    focus = draw(st.sampled_from(list(roster.classes) or roster.accounts))
    return Plan(("convert", "convert", *enabled), frozenset(roster.related(focus)))


def _bits(items: Sequence[str], mask: int) -> tuple[str, ...]:
    return tuple(item for i, item in enumerate(items) if mask >> i & 1)


def build_operation(
    roster: Roster, plan: Plan, earlier: Sequence[Op], seed: Seed, *, restore: bool = False
) -> Op:
    """One conversion operation, or a restore, aimed at the roster's ids. A restore mostly aims
    at an id an earlier operation converted."""
    kind_index, aim, pick, mask = seed
    kind: OpKind = "restore" if restore else plan.kinds[kind_index % len(plan.kinds)]
    if kind in ("drop_class", "shrink_section") and not roster.classes:
        kind = "convert"
    done = {(op.kind, op.target) for op in earlier}

    def choose(choices: Sequence[str], close: Iterable[str]) -> str:
        # Near the focus first, then ids this kind of operation has not hit yet (repeats are the
        # idempotency property's business): that is where operations meet.
        near = set(close)
        pool = [c for c in choices if c in near] if aim < 3 else []
        pool = pool or list(choices)
        pool = [c for c in pool if (kind, c) not in done] or pool
        # Half the time the first one left, in roster order (admins, teachers, students): a
        # class's teacher leaves before its students do.
        return pool[0 if pick % 2 else pick // 2 % len(pool)]

    if kind == "convert":
        return Op(kind, choose(roster.accounts, plan.focus))
    if kind == "lose_roles":
        lost = _bits(PLATFORM_ROLES, mask) or (PLATFORM_ROLES[mask % 3],)
        return Op(kind, choose(roster.accounts, plan.focus), roles=lost)
    if kind == "exit":
        return Op(kind, choose(sorted(roster.districts), ()))
    if kind == "restore":
        converted = [op.target for op in earlier if op.kind in ("convert", "lose_roles", "exit")]
        return Op(kind, choose([*roster.accounts, *roster.districts], converted))
    class_id = choose(sorted(roster.classes), plan.focus)
    if kind == "drop_class":
        return Op(kind, class_id)
    info = roster.classes[class_id]
    return Op(
        kind,
        class_id,
        students=_bits(info.students, mask),
        teachers=_bits(info.teachers, mask >> 4),
    )


@st.composite
def scenarios(draw: st.DrawFn, *, min_restores: int = 1) -> tuple[Roster, list[Op]]:
    """A roster and operations on it: conversions, then restores (mostly of what they
    converted), then more conversions. The three segments make "convert a teacher, convert her
    student, restore the teacher" turn up in most runs rather than one example in a thousand."""
    # The operations' random material comes first: drawn after a roster's many choices,
    # Hypothesis keeps lists short most of the time.
    segments = (
        draw(st.lists(SEEDS, min_size=2, max_size=3)),
        draw(st.lists(SEEDS, min_size=min_restores, max_size=2)),
        draw(st.lists(SEEDS, max_size=2)),
    )
    roster = draw(rosters())
    plan = draw(plans(roster))
    ops: list[Op] = []
    for index, seeds in enumerate(segments):
        for seed in seeds:
            ops.append(build_operation(roster, plan, ops, seed, restore=index == 1))
    return roster, ops
