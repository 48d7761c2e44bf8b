"""Properties of the conversion rules (SPEC §3) over generated rosters and operation sequences,
on Postgres and SQLite.

Hypothesis runs many examples inside one test call, so the function-scoped ``session`` fixture
cannot isolate them: each example opens its own connection and outer transaction (the conftest
recipe) and rolls it back at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, Table, func, select
from sqlalchemy.orm import Session

from models import (
    Account,
    Assignment,
    Class,
    ClassTeacher,
    District,
    Enrollment,
    Goal,
    JournalEntry,
    SkillProgress,
)
from tasks import conversion, exits
from tasks.errors import RestoreRefused
from tasks.roster import load_snapshot
from tasks.view import account_view
from tests.support.strategies import (
    PLATFORM_ROLES,
    Op,
    Roster,
    rosters,
    scenarios,
    section,
    snapshot,
    user,
)

T = "property-test"
RETENTION_DAYS = 30

PROPERTY = settings(
    # About 40 examples per backend keeps the file near a minute; raise it for a longer hunt.
    max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "40")),
    deadline=None,
    # ``engine`` is function-scoped only in name: it hands out a session-wide engine, and every
    # example opens (and rolls back) its own transaction on it.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

View = dict[str, Any]
Rows = dict[str, list[tuple[Any, ...]]]


# --------------------------------------------------------------------------------------------
# Harness


@contextmanager
def example_session(engine: Engine, roster: Roster) -> Iterator[Session]:
    """A session on a fresh outer transaction holding the loaded roster, rolled back after."""
    with engine.connect() as conn:
        outer = conn.begin()
        session = Session(
            bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            # Rows left by an earlier example (or test) would merge silently into the upserts.
            leftover = session.scalar(select(func.count()).select_from(Account))
            assert leftover == 0, f"the test database already holds {leftover} accounts"
            load_snapshot(session, roster.snapshot)
            yield session
        finally:
            session.close()
            outer.rollback()


def apply(session: Session, op: Op) -> int:
    """Carry out one operation; returns the journal entries it wrote (or restored).

    A refused restore (say, of an account a district exit converted) is a no-op: it runs in a
    savepoint, as the production session scope would roll it back.
    """
    if op.kind == "convert":
        return conversion.convert_account(session, op.target, trigger=T).journal_entries
    if op.kind == "lose_roles":
        return conversion.lose_roles(session, op.target, op.roles, trigger=T).journal_entries
    if op.kind == "drop_class":
        return conversion.drop_class(session, op.target, trigger=T).journal_entries
    if op.kind == "shrink_section":
        return conversion.shrink_section(
            session, op.target, students=op.students, teachers=op.teachers, trigger=T
        ).journal_entries
    if op.kind == "exit":
        return exits.run_in_process(session, op.target, trigger=T).journal_entries
    try:
        with session.begin_nested():
            result = conversion.restore(
                session, op.target, trigger=T, retention_days=RETENTION_DAYS
            )
    except RestoreRefused:
        return 0
    return result.entries


def views(session: Session, roster: Roster) -> dict[str, View]:
    return {account: account_view(session, account) for account in roster.accounts}


def journal_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(JournalEntry)) or 0


def _rows(session: Session, table: Any, *where: Any) -> list[tuple[Any, ...]]:
    assert isinstance(table, Table)
    return sorted((tuple(row) for row in session.execute(select(table).where(*where))), key=repr)


def learner_rows(session: Session) -> Rows:
    """Every learner-owned row, whole: skill progress, and independent classes with their
    teacher links, enrollments, goals and assignments."""
    independent = select(Class.id).where(Class.district_synced.is_(False))
    return {
        "progress": _rows(session, SkillProgress.__table__),
        "classes": _rows(session, Class.__table__, Class.district_synced.is_(False)),
        "class_teachers": _rows(
            session, ClassTeacher.__table__, ClassTeacher.class_id.in_(independent)
        ),
        "enrollments": _rows(session, Enrollment.__table__, Enrollment.class_id.in_(independent)),
        "goals": _rows(session, Goal.__table__, Goal.class_id.in_(independent)),
        "assignments": _rows(session, Assignment.__table__, Assignment.class_id.in_(independent)),
    }


# --------------------------------------------------------------------------------------------
# (a) learner-owned data never changes


@PROPERTY
@given(scenario=scenarios())
def test_no_operation_sequence_changes_learner_owned_rows(
    engine: Engine, scenario: tuple[Roster, list[Op]]
) -> None:
    roster, ops = scenario
    with example_session(engine, roster) as session:
        before = learner_rows(session)
        sums = conversion.learner_checksums(session, roster.accounts)
        assert len(before["progress"]) == roster.progress_rows
        for op in ops:
            apply(session, op)
        assert learner_rows(session) == before
        assert conversion.learner_checksums(session, roster.accounts) == sums


# --------------------------------------------------------------------------------------------
# (b) district-synced classes are visible only inside the program


# Shrunk failures, kept as explicit examples (they run first, and fail fast without shrinking).
# Restoring a teacher whose conversion dropped a class brings the class back with the enrollment
# of a student converted since: a grassroots account sees a district class.
TEACHER_RESTORED_AFTER_STUDENT_LEFT = (
    Roster.of(
        snapshot(
            {"dist0": "convert"},
            [user("d0-teacher0", "dist0", "teacher"), user("d0-student0", "dist0", "student")],
            [section("d0-sec0", "dist0", ["d0-teacher0"], ["d0-student0"])],
        )
    ),
    [Op("convert", "d0-teacher0"), Op("convert", "d0-student0"), Op("restore", "d0-teacher0")],
)
# Restoring a co-teacher brings back a section Clever deleted after she left (any removed class
# with a live teacher link is revived), with the links of accounts converted since.
SECTION_DELETED_THEN_TEACHER_RESTORED = (
    Roster.of(
        snapshot(
            {"dist0": "convert"},
            [
                user("d0-teacher0", "dist0", "teacher"),
                user("d0-teacher1", "dist0", "teacher"),
                user("d0-student0", "dist0", "student"),
            ],
            [section("d0-sec0", "dist0", ["d0-teacher0", "d0-teacher1"], ["d0-student0"])],
        )
    ),
    [
        Op("convert", "d0-teacher0"),
        Op("drop_class", "d0-sec0"),
        Op("convert", "d0-student0"),
        Op("restore", "d0-teacher0"),
    ],
)


@PROPERTY
@example(scenario=TEACHER_RESTORED_AFTER_STUDENT_LEFT)
@example(scenario=SECTION_DELETED_THEN_TEACHER_RESTORED)
@given(scenario=scenarios())
def test_only_active_district_accounts_see_district_synced_classes(
    engine: Engine, scenario: tuple[Roster, list[Op]]
) -> None:
    roster, ops = scenario
    with example_session(engine, roster) as session:
        for op in ops:
            apply(session, op)
        status = dict(session.execute(select(District.id, District.status)).tuples().all())
        class_district = dict(session.execute(select(Class.id, Class.district_id)).tuples().all())
        for account, view in views(session, roster).items():
            synced = [c["id"] for c in view["classes"] if c["district_synced"]]
            if not synced:
                continue
            assert view["kind"] == "district" and view["status"] == "active", (
                f"{account} ({view['kind']}, {view['status']}) sees district classes {synced}"
            )
            assert status[view["district"]] == "active", (
                f"{account} sees {synced} of exited district {view['district']}"
            )
            assert {class_district[c] for c in synced} == {view["district"]}


# --------------------------------------------------------------------------------------------
# (c) converting twice equals converting once


@PROPERTY
@given(scenario=scenarios(min_restores=0))
def test_applying_the_same_conversions_again_changes_nothing(
    engine: Engine, scenario: tuple[Roster, list[Op]]
) -> None:
    roster, ops = scenario
    with example_session(engine, roster) as session:
        # A restore legitimately undoes the conversions before it, so at the end only those
        # after the last restore that brought something back are expected to be applied already.
        replay: list[Op] = []
        for op in ops:
            restored = apply(session, op)
            if op.kind == "restore":
                replay = [] if restored else replay
                continue
            assert apply(session, op) == 0, f"{op!r} journaled again when repeated at once"
            replay.append(op)
        state, entries = views(session, roster), journal_count(session)
        for op in replay:
            assert apply(session, op) == 0, f"replaying {op!r} journaled something"
        assert journal_count(session) == entries
        assert views(session, roster) == state


# --------------------------------------------------------------------------------------------
# (d) restore after convert is the identity


@PROPERTY
@given(data=st.data(), roster=rosters())
def test_restore_after_conversion_or_district_exit_gives_back_every_view(
    engine: Engine, data: st.DataObject, roster: Roster
) -> None:
    # One undo per example (an account's conversion or role loss, or a district exit) keeps each
    # example to two snapshots of every view; the examples between them cover all three.
    undo = data.draw(st.sampled_from(["convert", "lose_roles", "exit"]), label="undo")
    with example_session(engine, roster) as session:
        before = views(session, roster)
        if undo == "exit":
            subject = data.draw(st.sampled_from(sorted(roster.districts)), label="district")
            exited = exits.run_in_process(session, subject, trigger=T)
            assert exited.journal_entries > 0
            status = select(District.status).where(District.id == subject)
            assert session.scalar(status) == "exited"
            conversion.restore(session, subject, trigger=T, retention_days=RETENTION_DAYS)
            assert session.scalar(status) == "active"
        else:
            subject = data.draw(st.sampled_from(roster.district_accounts), label="account")
            if undo == "convert":
                converted = conversion.convert_account(session, subject, trigger=T)
                assert converted.converted == [subject]
            else:
                lost = data.draw(
                    st.lists(st.sampled_from(PLATFORM_ROLES), min_size=1, max_size=2, unique=True),
                    label="lost roles",
                )
                converted = conversion.lose_roles(session, subject, lost, trigger=T)
            restored = conversion.restore(
                session, subject, trigger=T, retention_days=RETENTION_DAYS
            )
            assert restored.entries == converted.journal_entries
        assert views(session, roster) == before
