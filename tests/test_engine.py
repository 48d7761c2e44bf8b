"""Engine guarantees beyond the fixture scenarios: the learner-data invariant, purge after the
retention window, the roster loader refusing a malformed snapshot whole, and the mirror of every
Clever user whatever its roles (SPEC §4)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from models import (
    Account,
    Class,
    CleverRole,
    Enrollment,
    JournalEntry,
    Role,
    RosterUser,
    SkillProgress,
    utcnow,
)
from tasks import conversion, exits
from tasks.conversion import apply as conversion_apply
from tasks.conversion import journal as conversion_journal
from tasks.errors import InvariantViolation, NotFound, RestoreRefused
from tasks.roster import MAX_PROBLEMS, SnapshotError, load_snapshot, mirror
from tasks.view import account_view
from tests.support.scenario import (
    DISTRICT,
    KIM,
    LEO,
    MARIA,
    PAT,
    PEOPLE,
    RIVERA,
    S1,
    STEVE,
    example,
    ids,
)

GRASSROOTS = Path(sys.executable).parent / "grassroots"


def count(session: Session, model: Any) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def test_conversion_that_would_touch_learner_data_is_rolled_back_whole(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_snapshot(session, example())
    before = account_view(session, STEVE)
    real_mark = conversion_journal.mark

    def mark_and_lose_progress(*args: Any, **kwargs: Any) -> int:
        # A fault inside the conversion: a statement that deletes a learner's progress.
        session.execute(delete(SkillProgress).where(SkillProgress.student_id == STEVE))
        return real_mark(*args, **kwargs)

    monkeypatch.setattr(conversion_apply, "mark", mark_and_lose_progress)  # as apply calls it
    savepoint = session.begin_nested()
    with pytest.raises(InvariantViolation) as failure:
        conversion.convert_account(session, STEVE, trigger="test")
    savepoint.rollback()
    assert failure.value.reason == "invariant_violated"
    assert failure.value.account_ids == [STEVE]
    assert account_view(session, STEVE) == before
    assert count(session, JournalEntry) == 0


def test_purge_deletes_removed_rows_after_the_retention_window_and_keeps_live_ones(
    session: Session,
) -> None:
    load_snapshot(session, example())
    conversion.convert_account(session, KIM, trigger="test")  # drops 3a01 (Kim taught it alone)
    enrollments = count(session, Enrollment)
    assert conversion.purge(session, retention_days=30) == 0
    later = utcnow() + timedelta(days=31)
    purged = conversion.purge(session, retention_days=30, now=later)
    assert purged > 0
    assert count(session, Enrollment) < enrollments
    assert S1 not in ids(account_view(session, MARIA)["classes"])
    assert ids(account_view(session, KIM)["classes"]) == ["class-math-club"]
    with pytest.raises(RestoreRefused, match="retention window"):
        conversion.restore(session, KIM, trigger="test", retention_days=30, now=later)
    assert conversion.purge(session, retention_days=30, now=later) == 0


def _live_district_classes(session: Session, district_id: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Class)
            .where(
                Class.district_id == district_id,
                Class.district_synced.is_(True),
                Class.removed_by.is_(None),
            )
        )
        or 0
    )


def test_seeding_an_exited_district_again_after_the_purge_brings_nothing_back(
    session: Session,
) -> None:
    load_snapshot(session, example())
    before = account_view(session, STEVE)
    exits.run_in_process(session, DISTRICT, trigger="test")
    conversion.purge(session, retention_days=30, now=utcnow() + timedelta(days=31))
    assert _live_district_classes(session, DISTRICT) == 0
    after = account_view(session, STEVE)

    result = load_snapshot(session, example())

    data = example()
    sections = {sec["id"] for sec in data["sections"]}
    platform = data["platform"]
    assert result.left_out == {
        "users": len(data["users"]),
        "sections": len(sections),
        "goals": sum(g["class"] in sections for g in platform["goals"]),
        "assignments": sum(a["class"] in sections for a in platform["assignments"]),
    }
    assert result.left_out["goals"] > 0
    assert _live_district_classes(session, DISTRICT) == 0
    assert account_view(session, STEVE) == after
    assert after["kind"] == "grassroots" and after["progress"] == before["progress"]
    assert not any(c["district_synced"] for c in after["classes"])


def test_an_older_snapshot_does_not_put_a_converted_account_back_in_district_classes(
    session: Session,
) -> None:
    # Steve left the roster and was converted; once the purge has deleted his removed links, the
    # snapshot from before he left still lists him in his sections.
    load_snapshot(session, example())
    conversion.convert_account(session, STEVE, trigger="test")
    conversion.purge(session, retention_days=30, now=utcnow() + timedelta(days=31))
    converted = account_view(session, STEVE)
    maria = account_view(session, MARIA)

    result = load_snapshot(session, example())

    assert not any(result.left_out.values())
    assert account_view(session, STEVE) == converted
    assert not any(c["district_synced"] for c in converted["classes"])
    assert account_view(session, MARIA) == maria


def test_restore_is_refused_past_the_retention_window(session: Session) -> None:
    load_snapshot(session, example())
    conversion.convert_account(session, STEVE, trigger="test")
    with pytest.raises(RestoreRefused, match="retention window"):
        conversion.restore(
            session, STEVE, trigger="test", retention_days=30, now=utcnow() + timedelta(days=31)
        )


def broken(path: list[Any], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(example())
    node: Any = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            broken(["users", 3, "roles"], {}),
            "users[3].roles (id 58c81dcea3627927150003ed)",
        ),
        (broken(["users", 3, "roles", "staff"], "yes"), "users[3].roles.staff"),
        (broken(["sections", 0, "students", 0], "0" * 24), "unknown student"),
        (broken(["platform", "progress", 0, "points"], -5), "platform.progress[0]"),
        (broken(["districts", 0, "policy", "admin_removal"], "delete"), "districts[0]"),
        (broken(["users", 1, "id"], "5f8e2c1a9b7d4e0012ab0001"), "duplicate id"),
    ],
)
def test_malformed_snapshot_is_refused_whole_naming_the_bad_record(
    session: Session, data: dict[str, Any], message: str
) -> None:
    with pytest.raises(SnapshotError, match=re.escape(message)):
        load_snapshot(session, data)
    assert count(session, Account) == 0


def broken_in_places(*changes: tuple[list[Any], Any]) -> dict[str, Any]:
    data = copy.deepcopy(example())
    for path, value in changes:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return data


def problems(failure: pytest.ExceptionInfo[SnapshotError]) -> list[str]:
    message = str(failure.value)
    assert "\n" not in message
    return message.split("; ")


def personal_data(data: dict[str, Any]) -> list[str]:
    people = [*data["users"], *data["platform"]["accounts"]]
    found = [p["email"] for p in people if p.get("email")]
    for person in people:
        name = person.get("name")
        found += [v for v in name.values() if v] if isinstance(name, dict) else [name or ""]
    return [f for f in found if len(f) > 2]  # a middle initial is in any message


def test_a_snapshot_with_several_malformed_records_names_every_one(session: Session) -> None:
    data = broken_in_places(
        (["users", 3, "roles"], {}),
        (["users", 4, "id"], "m.lopez@students.example-isd.org"),  # an email where the id goes
        (["sections", 2, "name"], ""),
        (["platform", "progress", 0, "points"], -5),
        (["districts", 0, "policy", "admin_removal"], "delete"),
    )
    with pytest.raises(SnapshotError) as failure:
        load_snapshot(session, data)
    named = problems(failure)
    maria = "58c81dcea3627927150003ee"  # users[4]'s id before an email took its place
    assert [p.split(":")[0] for p in named] == [
        "districts[0].policy.admin_removal (id 5b2a6f0c8e9d7a0011223344)",
        "users[3].roles (id 58c81dcea3627927150003ed)",
        "users[4].id",  # not named by what stands in its id
        "sections[2].name (id 60a1b2c3d4e5f60718293a03)",
        "platform.progress[0].points",
        # In the same pass: the records that name an id no record now has.
        "sections[0] (id 60a1b2c3d4e5f60718293a01)",
        "platform.classes[1] (id class-tutoring)",
        f"platform.progress[2] (user {maria}, skill ratios-intro)",
        f"platform.progress[3] (user {maria}, skill add-fractions)",
    ]
    assert not [p for p in personal_data(data) if p in str(failure.value)]
    assert count(session, Account) == 0


def test_a_snapshot_with_several_bad_references_names_every_one(session: Session) -> None:
    original = example()
    goal = original["platform"]["goals"][0]["id"]
    data = broken_in_places(
        (["platform", "goals", 1, "id"], goal),
        (["sections", 0, "students", 0], "0" * 24),
        (["sections", 1, "teachers"], ["nobody"]),
        (["platform", "goals", 1, "class"], "no-such-class"),
        (
            ["platform", "accounts"],
            [*original["platform"]["accounts"], {"id": STEVE, "roles": ["student"]}],
        ),
    )
    with pytest.raises(SnapshotError) as failure:
        load_snapshot(session, data)
    assert problems(failure) == [
        f"platform.goals[1] (id {goal}): duplicate id",
        f"platform.accounts[1] (id {STEVE}): id already used by a user",
        "sections[0] (id 60a1b2c3d4e5f60718293a01): unknown student " + "0" * 24,
        "sections[1] (id 60a1b2c3d4e5f60718293a02): unknown teacher nobody",
        f"platform.goals[1] (id {goal}): unknown class no-such-class",
    ]
    assert not [p for p in personal_data(data) if p in str(failure.value)]
    assert count(session, Account) == 0


def test_shape_and_reference_problems_are_named_together_in_one_pass(session: Session) -> None:
    """Three records of the wrong shape and two broken references: all five in one message,
    and no reference to a malformed record (the section naming Steve) counted against it."""
    data = broken_in_places(
        (["users", 3, "roles"], {}),  # Steve, named by section 0
        (["sections", 2, "name"], ""),
        (["platform", "progress", 0, "points"], -5),
        (["sections", 1, "teachers"], ["nobody"]),
        (["platform", "goals", 1, "class"], "no-such-class"),
    )
    goal = data["platform"]["goals"][1]["id"]
    with pytest.raises(SnapshotError) as failure:
        load_snapshot(session, data)
    assert [p.split(": ")[0] for p in problems(failure)] == [
        f"users[3].roles (id {STEVE})",
        "sections[2].name (id 60a1b2c3d4e5f60718293a03)",
        "platform.progress[0].points",
        "sections[1] (id 60a1b2c3d4e5f60718293a02)",
        f"platform.goals[1] (id {goal})",
    ]
    assert problems(failure)[3:] == [
        "sections[1] (id 60a1b2c3d4e5f60718293a02): unknown teacher nobody",
        f"platform.goals[1] (id {goal}): unknown class no-such-class",
    ]
    assert count(session, Account) == 0


def test_a_snapshot_whose_structure_is_broken_names_that_alone(session: Session) -> None:
    data = broken_in_places((["users"], {"not": "a list"}), (["sections", 0, "name"], ""))
    with pytest.raises(SnapshotError) as failure:
        load_snapshot(session, data)
    assert [p.split(":")[0] for p in problems(failure)] == [
        "users",
        "sections[0].name (id 60a1b2c3d4e5f60718293a01)",
    ]


@pytest.mark.parametrize("kind", ["validation", "reference"])
def test_past_the_first_twenty_problems_only_their_number_is_given(
    session: Session, kind: str
) -> None:
    if kind == "validation":
        rows = [
            {"user": STEVE, "skill": f"s{n}", "points": -1, "mastery": "mastered"}
            for n in range(25)
        ]
        data = broken_in_places((["platform", "progress"], rows))
    else:
        data = broken_in_places((["sections", 0, "students"], [f"ghost-{n}" for n in range(25)]))
    with pytest.raises(SnapshotError) as failure:
        load_snapshot(session, data)
    named = problems(failure)
    assert len(named) == MAX_PROBLEMS + 1 == 21
    assert named[-1] == "and 5 more problems"
    assert len(set(named[:-1])) == MAX_PROBLEMS


def test_seed_command_is_idempotent_and_refuses_a_bad_file_with_nothing_written(
    database_url: str, tmp_path: Path
) -> None:
    env = {"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"}
    good = tmp_path / "good.json"
    good.write_text(json.dumps(example()))
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            broken_in_places(
                (["sections", 1, "teachers"], ["nobody"]), (["sections", 0, "students"], ["ghost"])
            )
        )
    )

    def grassroots(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(GRASSROOTS), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )

    refused = grassroots("seed", str(bad))
    assert refused.returncode == 1
    # Every problem, on the one line the command prints.
    assert refused.stderr.splitlines() == [
        f"grassroots: {bad}: sections[0] (id 60a1b2c3d4e5f60718293a01): unknown student ghost;"
        " sections[1] (id 60a1b2c3d4e5f60718293a02): unknown teacher nobody; nothing was loaded"
    ]
    assert grassroots("account", "show", STEVE).returncode == 1
    assert grassroots("seed", str(good)).returncode == 0
    first = json.loads(grassroots("account", "show", STEVE, "--json").stdout)
    assert grassroots("seed", str(good)).returncode == 0
    assert json.loads(grassroots("account", "show", STEVE, "--json").stdout) == first
    exit_ = grassroots("district", "exit", "5b2a6f0c8e9d7a0011223344", "--in-process")
    assert exit_.returncode == 0, exit_.stderr
    steve = json.loads(grassroots("account", "show", STEVE, "--json").stdout)
    assert steve["kind"] == "grassroots" and ids(steve["classes"]) == ["class-math-club"]
    assert steve["progress"] == first["progress"]
    assert grassroots("restore", "5b2a6f0c8e9d7a0011223344").returncode == 0
    assert json.loads(grassroots("account", "show", STEVE, "--json").stdout) == first
    missing = grassroots("seed", str(tmp_path / "nope.json"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_bulk_copy_path_loads_exactly_what_the_row_path_loads(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    savepoint = session.begin_nested()
    load_snapshot(session, example())
    by_rows = {p: account_view(session, p) for p in PEOPLE}
    mirrored = roster_users(session)
    savepoint.rollback()
    monkeypatch.setattr(mirror, "COPY_UPSERT_MIN_ROWS", 1)  # every table through COPY on Postgres
    load_snapshot(session, example())
    load_snapshot(session, example())  # and again: existing rows take the upsert
    assert {p: account_view(session, p) for p in PEOPLE} == by_rows
    assert roster_users(session) == mirrored
    changed = example()
    changed["users"][2]["roles"]["staff"] = {}  # Kim
    load_snapshot(session, changed)
    assert roster_users(session) == mirrored | {KIM: [CleverRole.STAFF, CleverRole.TEACHER]}


# --------------------------------------------------------------------------------------------
# Clever's whole data: every role, in the mirror (SPEC §4)

COUNSELOR = "5f8e2c1a9b7d4e0012ab0004"  # staff only
PARENT = "5f8e2c1a9b7d4e0012ab0005"  # contact only, Steve's parent
SUPERINTENDENT = "5f8e2c1a9b7d4e0012ab0009"


def roster_users(session: Session) -> dict[str, list[str]]:
    return dict(session.execute(select(RosterUser.id, RosterUser.roles)).tuples().all())


def test_every_user_of_the_example_district_is_mirrored_with_its_clever_roles(
    session: Session,
) -> None:
    load_snapshot(session, example())
    admin, teacher, student = CleverRole.DISTRICT_ADMIN, CleverRole.TEACHER, CleverRole.STUDENT
    assert roster_users(session) == {
        PAT: [admin],
        RIVERA: [admin, teacher],
        KIM: [teacher],
        STEVE: [student],
        MARIA: [student],
        LEO: [student],
        COUNSELOR: [CleverRole.STAFF],
        PARENT: [CleverRole.CONTACT],
    }
    # Seeding again changes nothing.
    load_snapshot(session, example())
    assert len(roster_users(session)) == 8


def test_staff_and_contact_only_users_seed_with_a_mirror_row_and_no_account(
    session: Session,
) -> None:
    result = load_snapshot(session, example())
    assert result.users == 8
    for who in (COUNSELOR, PARENT):
        with pytest.raises(NotFound):
            account_view(session, who)
    # The six district accounts and Sam's.
    assert count(session, Account) == 7


def test_superintendent_who_is_district_admin_and_staff_seeds_as_admin_with_reports(
    session: Session,
) -> None:
    data = example()
    data["users"].append(
        {
            "id": SUPERINTENDENT,
            "district": DISTRICT,
            "email": "superintendent@example-isd.org",
            "name": {"first": "Morgan", "middle": None, "last": "Hale"},
            "roles": {
                "district_admin": {"title": "Superintendent"},
                "staff": {"title": "Superintendent", "staff_id": "S-0001", "roles": []},
            },
        }
    )
    load_snapshot(session, data)
    view = account_view(session, SUPERINTENDENT)
    assert view["kind"] == "district" and view["status"] == "active"
    assert view["roles"] == [Role.ADMIN] and view["district_reports"] == "allowed"
    assert roster_users(session)[SUPERINTENDENT] == [CleverRole.DISTRICT_ADMIN, CleverRole.STAFF]


def test_a_role_clever_adds_later_is_ignored_in_a_snapshot(session: Session) -> None:
    data = example()
    data["users"][3]["roles"]["mentor"] = {"since": 2024}  # Steve, a student
    data["users"].append(
        {"id": SUPERINTENDENT, "district": DISTRICT, "roles": {"chaperone": "trips only"}}
    )
    load_snapshot(session, data)
    assert account_view(session, STEVE)["roles"] == [Role.STUDENT]
    mirrored = roster_users(session)
    assert mirrored[STEVE] == [CleverRole.STUDENT]
    # No role we know: listed by the roster, without an account.
    assert mirrored[SUPERINTENDENT] == []
    with pytest.raises(NotFound):
        account_view(session, SUPERINTENDENT)


def test_staff_or_contact_named_where_an_account_is_needed_is_refused_naming_the_record(
    session: Session,
) -> None:
    data = broken_in_places(
        (["sections", 0, "teachers"], [KIM, COUNSELOR]),
        (["sections", 2, "students", 0], PARENT),
        (["platform", "progress", 0, "user"], PARENT),
        (["platform", "classes", 0, "teacher"], COUNSELOR),
    )
    with pytest.raises(SnapshotError) as failure:
        load_snapshot(session, data)
    assert problems(failure) == [
        f"sections[0] (id 60a1b2c3d4e5f60718293a01): user {COUNSELOR} is not a teacher",
        f"sections[2] (id 60a1b2c3d4e5f60718293a03): user {PARENT} is not a student",
        f"platform.classes[0] (id class-math-club): user {COUNSELOR} has no platform role",
        f"platform.progress[0] (user {PARENT}, skill add-fractions):"
        f" user {PARENT} has no platform role",
    ]
    assert count(session, Account) == 0 and count(session, RosterUser) == 0


def test_a_teacher_who_also_becomes_staff_keeps_the_account_and_the_mirror_gains_staff(
    session: Session,
) -> None:
    load_snapshot(session, example())
    before = account_view(session, KIM)
    data = example()
    data["users"][2]["roles"]["staff"] = {"title": "Math Coach"}  # Kim
    load_snapshot(session, data)
    assert account_view(session, KIM) == before
    assert roster_users(session)[KIM] == [CleverRole.STAFF, CleverRole.TEACHER]


def test_a_snapshot_with_values_the_database_cannot_store_is_refused_naming_each_field(
    session: Session,
) -> None:
    data = broken_in_places(
        (["users", 0, "name", "first"], "Pat\x00"),
        (["users", 1, "email"], "\ud800@example.org"),
        (["sections", 0, "name"], "Math\x00"),
        (["platform", "goals", 0, "course"], "\udfff"),
        (["users", 2, "name", "last"], "x" * 201),
    )
    with pytest.raises(SnapshotError) as failure:
        load_snapshot(session, data)
    named = problems(failure)
    nul = "contains a NUL character, which the database cannot store"
    surrogate = r"contains a lone surrogate (\ud800-\udfff), which UTF-8 cannot encode"
    assert [p.split(": ", 1)[1] for p in named] == [
        nul,
        surrogate,
        "String should have at most 200 characters",
        nul,
        surrogate,
    ]
    assert [p.split(" ", 1)[0] for p in named] == [
        "users[0].name.first",
        "users[1].email",
        "users[2].name.last",
        "sections[0].name",
        "platform.goals[0].course",
    ]
    assert count(session, Account) == 0
