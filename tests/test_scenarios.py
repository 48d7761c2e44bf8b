"""Scenarios A–F of tests/fixtures/example-isd.md, through the plain conversion functions."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import Account, CleverRole, JournalEntry, RosterUser
from tasks import conversion, exits
from tasks.roster import load_snapshot
from tasks.view import account_view, find_account, reports_allowed
from tests.support.scenario import (
    DISTRICT,
    KIM,
    LEO,
    MARIA,
    PAT,
    PEOPLE,
    RIVERA,
    S1,
    S2,
    S3,
    SAM,
    STEVE,
    example,
    ids,
)

T = "test"
COUNSELOR = "5f8e2c1a9b7d4e0012ab0004"  # Dana, staff only
PARENT = "5f8e2c1a9b7d4e0012ab0005"  # Grace, contact only


def views(session: Session) -> dict[str, dict[str, Any]]:
    return {p: account_view(session, p) for p in PEOPLE}


def journal_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(JournalEntry)) or 0


@pytest.fixture
def seeded(session: Session) -> Session:
    load_snapshot(session, example("convert"))
    return session


def assert_exit_outcome(v: dict[str, dict[str, Any]]) -> None:
    for person in (PAT, RIVERA, KIM, STEVE, MARIA, LEO):
        assert v[person]["kind"] == "grassroots"
        assert v[person]["district"] is None
        assert v[person]["district_reports"] == "denied"
        assert not any(c["district_synced"] for c in v[person]["classes"])
    assert v[RIVERA]["roles"] == ["teacher"] and v[RIVERA]["classes"] == []
    assert v[RIVERA]["status"] == "active"
    assert ids(v[KIM]["classes"]) == ["class-math-club"]
    assert ids(v[KIM]["goals"]) == ["goal-club-fractions"]
    assert v[KIM]["students"] == [STEVE]
    assert ids(v[STEVE]["classes"]) == ["class-math-club"]
    assert ids(v[STEVE]["goals"]) == ["goal-club-fractions"]
    assert v[STEVE]["assignments"] == [] and v[STEVE]["coaches"] == [KIM]
    assert ids(v[MARIA]["classes"]) == ["class-tutoring"]
    assert ids(v[MARIA]["assignments"]) == ["asg-tutoring-review"]
    assert v[MARIA]["coaches"] == [SAM]
    assert v[LEO]["classes"] == [] and v[LEO]["goals"] == [] and v[LEO]["coaches"] == []
    assert v[LEO]["assignments"] == []
    for view in v.values():
        assert not {S1, S2, S3} & set(ids(view["classes"]))
        assert not {g["class"] for g in view["goals"] + view["assignments"]} & {S1, S2, S3}


def test_district_exit_with_convert_policy_matches_scenario_a(seeded: Session) -> None:
    before = views(seeded)
    exits.run_in_process(seeded, DISTRICT, trigger=T)
    after = views(seeded)
    assert_exit_outcome(after)
    assert after[PAT]["roles"] == ["teacher"] and after[PAT]["status"] == "active"
    assert after[PAT]["classes"] == []
    for person in (STEVE, MARIA, LEO):
        assert after[person]["progress"] == before[person]["progress"]
        assert len(after[person]["progress"]) == len(before[person]["progress"]) > 0
    assert after[SAM] == before[SAM] | {"students": [MARIA]}


def test_district_exit_with_remove_policy_removes_admin_only_account(session: Session) -> None:
    load_snapshot(session, example("remove"))
    exits.run_in_process(session, DISTRICT, trigger=T)
    v = views(session)
    assert v[PAT]["status"] == "removed"
    assert not reports_allowed(session, find_account(session, PAT))
    assert v[RIVERA]["status"] == "active" and v[RIVERA]["roles"] == ["teacher"]
    assert_exit_outcome(v)


def test_deleted_student_leaves_district_classes_but_keeps_club_scenario_c(seeded: Session) -> None:
    before = views(seeded)
    conversion.convert_account(seeded, STEVE, trigger=T)
    v = views(seeded)
    assert v[STEVE]["kind"] == "grassroots" and v[STEVE]["district"] is None
    assert ids(v[STEVE]["classes"]) == ["class-math-club"]
    assert v[STEVE]["coaches"] == [KIM]
    assert v[STEVE]["progress"] == before[STEVE]["progress"]
    assert S1 in ids(v[MARIA]["classes"]) and "goal-g5-math" in ids(v[MARIA]["goals"])
    assert ids(v[KIM]["classes"]) == [S1, S2, "class-math-club"]
    assert ids(v[RIVERA]["classes"]) == [S2, S3]
    assert STEVE not in v[RIVERA]["students"]


def test_deleted_teacher_drops_only_classes_nobody_else_teaches_scenario_d(seeded: Session) -> None:
    conversion.convert_account(seeded, KIM, trigger=T)
    v = views(seeded)
    assert S1 not in ids(v[STEVE]["classes"]) and S1 not in ids(v[MARIA]["classes"])
    assert "goal-g5-math" not in ids(v[STEVE]["goals"] + v[MARIA]["goals"])
    assert S2 in ids(v[STEVE]["classes"]) and "asg-p2-decimals" in ids(v[STEVE]["assignments"])
    assert ids(v[KIM]["classes"]) == ["class-math-club"] and v[KIM]["kind"] == "grassroots"
    assert v[KIM]["roles"] == ["teacher"]
    assert v[STEVE]["coaches"] == sorted([KIM, RIVERA])
    assert ids(v[RIVERA]["classes"]) == [S2, S3]


def test_admin_losing_admin_role_stays_district_teacher_scenario_e(seeded: Session) -> None:
    before = views(seeded)
    assert before[RIVERA]["district_reports"] == "allowed"
    conversion.lose_roles(seeded, RIVERA, ["admin"], trigger=T)
    after = views(seeded)
    assert after[RIVERA]["district_reports"] == "denied"
    assert after[RIVERA]["roles"] == ["teacher"] and after[RIVERA]["kind"] == "district"
    assert (
        after[RIVERA] | {"district_reports": "allowed", "roles": ["admin", "teacher"]}
        == before[RIVERA]
    )
    for person in PEOPLE:
        if person != RIVERA:
            assert after[person] == before[person]


@pytest.mark.parametrize(
    "scenario",
    ["exit", "student", "teacher", "admin_role"],
)
def test_every_scenario_twice_equals_once_and_journals_nothing_new_scenario_f(
    seeded: Session, scenario: str
) -> None:
    def run() -> conversion.Outcome:
        if scenario == "exit":
            return exits.run_in_process(seeded, DISTRICT, trigger=T)
        if scenario == "student":
            return conversion.convert_account(seeded, STEVE, trigger=T)
        if scenario == "teacher":
            return conversion.convert_account(seeded, KIM, trigger=T)
        return conversion.lose_roles(seeded, RIVERA, ["admin"], trigger=T)

    first = run()
    assert first.journal_entries > 0
    state, entries = views(seeded), journal_count(seeded)
    second = run()
    assert second.journal_entries == 0 and second.converted == []
    assert views(seeded) == state and journal_count(seeded) == entries


@pytest.mark.parametrize("who", [STEVE, KIM, PAT, RIVERA, LEO])
def test_restore_brings_back_exactly_the_state_before_conversion(seeded: Session, who: str) -> None:
    before = views(seeded)
    conversion.convert_account(seeded, who, trigger=T)
    assert views(seeded) != before
    result = conversion.restore(seeded, who, trigger=T, retention_days=30)
    assert result.entries > 0
    assert views(seeded) == before


def test_restore_of_district_undoes_the_whole_exit(seeded: Session) -> None:
    before = views(seeded)
    exits.run_in_process(seeded, DISTRICT, trigger=T)
    conversion.restore(seeded, DISTRICT, trigger=T, retention_days=30)
    assert views(seeded) == before
    # and the district can leave again afterwards
    exits.run_in_process(seeded, DISTRICT, trigger=T)
    assert_exit_outcome(views(seeded))


@pytest.mark.parametrize("policy", ["convert", "remove"])
def test_the_counselor_and_the_parent_are_mirrored_and_never_get_an_account(
    session: Session, policy: str
) -> None:
    load_snapshot(session, example(policy))
    exits.run_in_process(session, DISTRICT, trigger=T)
    mirrored = dict(session.execute(select(RosterUser.id, RosterUser.roles)).tuples().all())
    assert mirrored[COUNSELOR] == [CleverRole.STAFF]
    assert mirrored[PARENT] == [CleverRole.CONTACT]
    accounts = set(session.scalars(select(Account.id)))
    assert accounts == set(PEOPLE) and not {COUNSELOR, PARENT} & accounts
