"""Write a synthetic roster snapshot (SPEC §5.1) of one district, the same for the same options.

    .venv/bin/python -m bench.make_district --students 100000 --teachers 4000 --out /tmp/big.json

Users and sections have the shape of Clever v3 User and Section objects, with 24-hex ids like
Clever's. Every teacher has ``--sections-per-teacher`` district sections (some co-taught with a
neighbouring teacher), each with a goal and an assignment; some teachers also have an independent
club with its own goal; every student has progress in ``--skills-per-student`` skills.

The benchmarks' published figures were measured on rosters of this shape: ids, random draws and
their order are kept stable, so a given ``--seed`` always yields the same roster.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

# Spelled out, not imported from models/: this stands for a roster file from outside, and must
# keep producing the same file whatever the application's internals become.
POLICIES = ("convert", "remove")  # a district's admin_removal (SPEC §5.1)
MASTERY_LEVELS = ("attempted", "familiar", "proficient", "mastered")
SKILLS = 200  # progress rows draw their skills from skill-0 … skill-199
SCHOOLS = 10  # teachers and their sections are spread over this many schools
CLUB_SIZE = 10
TIMESTAMP = "2025-08-01T10:00:00.000Z"


def clever_id(kind: str, number: int, seed: int) -> str:
    """A stable Clever-like id: 24 hex digits of a hash of the seed, kind and number."""
    digest = hashlib.sha1(f"{seed}:{kind}:{number}".encode(), usedforsecurity=False)
    return digest.hexdigest()[:24]


def make_district(
    *,
    students: int = 1000,
    teachers: int = 40,
    admins: int = 3,
    sections_per_teacher: int = 5,
    students_per_section: int = 25,
    co_taught: float = 0.1,
    independent: float = 0.2,
    skills_per_student: int = 5,
    policy: str = "convert",
    district_id: str | None = None,
    seed: int = 1,
) -> dict[str, Any]:
    """The roster snapshot, ready for ``json.dump`` and ``grassroots seed``.

    One admin in three (the 1st, 4th, …) is a teacher who also holds ``district_admin``; the
    others are admins only. ``co_taught`` and ``independent`` are the chances that a section gets
    a co-teacher and that a teacher has an independent class.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    rng = random.Random(seed)  # noqa: S311  (test data, reproducible by design)
    ids = _Ids(district_id or clever_id("district", 0, seed), seed)
    teacher_ids = [ids.of("teacher", i) for i in range(teachers)]
    student_ids = [ids.of("student", i) for i in range(students)]
    users = _users(ids, teacher_ids, student_ids, admins)
    # The draws below happen in one fixed order (per section: co-teacher, then its students; then
    # per teacher: a club; then per student: skills): reordering them changes every roster.
    sections, goals, assignments = _sections(
        rng,
        ids,
        teacher_ids,
        student_ids,
        per_teacher=sections_per_teacher,
        per_section=min(students_per_section, students),
        co_taught=co_taught,
    )
    classes = _clubs(rng, teacher_ids, student_ids, independent, goals)
    return {
        "districts": [
            {
                "id": ids.district,
                "name": f"Synthetic District {seed}",
                "policy": {"admin_removal": policy},
            }
        ],
        "users": users,
        "sections": sections,
        "platform": {
            "accounts": [],
            "classes": classes,
            "goals": goals,
            "assignments": assignments,
            "progress": _progress(rng, student_ids, skills_per_student),
        },
    }


class _Ids:
    """The district's id, and the stable ids of everything in it."""

    def __init__(self, district: str, seed: int) -> None:
        self.district, self.seed = district, seed

    def of(self, kind: str, number: int) -> str:
        return clever_id(kind, number, self.seed)

    def user(
        self, uid: str, email: str, first: str, last: str, roles: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "id": uid,
            "district": self.district,
            "email": email,
            "name": {"first": first, "middle": None, "last": last},
            "created": TIMESTAMP,
            "last_modified": TIMESTAMP,
            "roles": roles,
        }


def _users(
    ids: _Ids, teacher_ids: list[str], student_ids: list[str], admins: int
) -> list[dict[str, Any]]:
    """Teachers, then the admins who do not teach, then students."""
    users = [
        ids.user(
            uid,
            f"teacher{i}@d.example.org",
            "Teacher",
            str(i),
            {"teacher": {"sis_id": f"T-{i}", "school": ids.of("school", i % SCHOOLS)}},
        )
        for i, uid in enumerate(teacher_ids)
    ]
    admin_role = {"title": "Admin"}
    for i in range(admins):
        if i % 3 == 0 and i < len(teacher_ids):
            users[i]["roles"]["district_admin"] = dict(admin_role)
        else:
            users.append(
                ids.user(
                    ids.of("admin", i),
                    f"admin{i}@d.example.org",
                    "Admin",
                    str(i),
                    {"district_admin": dict(admin_role)},
                )
            )
    users.extend(
        ids.user(
            uid,
            f"student{i}@students.d.example.org",
            "Student",
            str(i),
            {"student": {"sis_id": f"S-{i}", "grade": str(1 + i % 12)}},
        )
        for i, uid in enumerate(student_ids)
    )
    return users


Rows = list[dict[str, Any]]


def _sections(
    rng: random.Random,
    ids: _Ids,
    teacher_ids: list[str],
    student_ids: list[str],
    *,
    per_teacher: int,
    per_section: int,
    co_taught: float,
) -> tuple[Rows, Rows, Rows]:
    """Each teacher's sections, with a goal and an assignment each."""
    sections: Rows = []
    goals: Rows = []
    assignments: Rows = []
    teachers = len(teacher_ids)
    for t, teacher in enumerate(teacher_ids):
        for _ in range(per_teacher):
            n = len(sections)
            section_id = ids.of("section", n)
            section_teachers = [teacher]
            # The chance is drawn even where no co-teacher exists, to keep the sequence.
            if rng.random() < co_taught and teachers > 1:
                neighbours = (teacher_ids[t - 1], teacher_ids[(t + 1) % teachers])
                section_teachers.append(rng.choice([x for x in neighbours if x != teacher]))
            sections.append(
                {
                    "id": section_id,
                    "district": ids.district,
                    "school": ids.of("school", t % SCHOOLS),
                    "name": f"Section {n}",
                    "subject": "math",
                    "teacher": teacher,
                    "teachers": section_teachers,
                    "students": rng.sample(student_ids, per_section),
                }
            )
            goals.append(
                {"id": f"goal-{n}", "class": section_id, "created_by": teacher, "course": "math"}
            )
            assignments.append(
                {
                    "id": f"asg-{n}",
                    "class": section_id,
                    "created_by": teacher,
                    "title": f"Assignment {n}",
                }
            )
    return sections, goals, assignments


def _clubs(
    rng: random.Random,
    teacher_ids: list[str],
    student_ids: list[str],
    independent: float,
    goals: Rows,
) -> Rows:
    """Teachers' independent classes, each with a goal (added to ``goals``)."""
    classes: Rows = []
    for t, teacher in enumerate(teacher_ids):
        if rng.random() < independent:
            class_id = f"class-{t}"
            members = rng.sample(student_ids, min(CLUB_SIZE, len(student_ids)))
            classes.append(
                {"id": class_id, "name": f"Club {t}", "teacher": teacher, "students": members}
            )
            goals.append(
                {"id": f"goal-club-{t}", "class": class_id, "created_by": teacher, "course": "math"}
            )
    return classes


def _progress(rng: random.Random, student_ids: list[str], skills_per_student: int) -> Rows:
    progress: Rows = []
    for student in student_ids:
        for skill in rng.sample(range(SKILLS), skills_per_student):
            points = rng.randrange(0, 1000)
            mastery = rng.choice(MASTERY_LEVELS)
            progress.append(
                {"user": student, "skill": f"skill-{skill}", "points": points, "mastery": mastery}
            )
    return progress


def write_district(roster: dict[str, Any], out: Path) -> None:
    with out.open("w") as f:
        json.dump(roster, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--students", type=int, default=1000)
    parser.add_argument("--teachers", type=int, default=40)
    parser.add_argument(
        "--admins", type=int, default=3, help="district admins (a third also teach)"
    )
    parser.add_argument("--sections-per-teacher", type=int, default=5)
    parser.add_argument("--students-per-section", type=int, default=25)
    parser.add_argument("--co-taught", type=float, default=0.1, help="chance of a co-teacher")
    parser.add_argument(
        "--independent", type=float, default=0.2, help="chance of a teacher's independent class"
    )
    parser.add_argument("--skills-per-student", type=int, default=5)
    parser.add_argument("--policy", choices=POLICIES, default="convert")
    parser.add_argument("--district-id", default=None, help="default: derived from --seed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="-", help="a file, or - for standard output")
    args = parser.parse_args(argv)
    roster = make_district(
        students=args.students,
        teachers=args.teachers,
        admins=args.admins,
        sections_per_teacher=args.sections_per_teacher,
        students_per_section=args.students_per_section,
        co_taught=args.co_taught,
        independent=args.independent,
        skills_per_student=args.skills_per_student,
        policy=args.policy,
        district_id=args.district_id,
        seed=args.seed,
    )
    if args.out == "-":
        json.dump(roster, sys.stdout)
        return
    write_district(roster, Path(args.out))
    counts = ", ".join(
        f"{len(items)} {name}"
        for name, items in (
            ("users", roster["users"]),
            ("sections", roster["sections"]),
            ("progress rows", roster["platform"]["progress"]),
        )
    )
    print(f"{args.out}: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
