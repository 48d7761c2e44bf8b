"""The roster sync from the Clever Data API (SPEC §5.8), against a Clever-shaped server and a real
database: the pull, the reconcile, what is recorded for the workers, and what a failed pull does
(nothing). Events it records are applied here with the same rule the workers use."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import (
    Account,
    Class,
    ClassTeacher,
    District,
    Enrollment,
    EventStatus,
    PollCursor,
    RosterEvent,
    RosterSync,
    RosterUser,
)
from tasks import events
from tasks.roster import load_snapshot
from tasks.view import account_view
from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.databases import PgDatabases
from tests.support.fake_clever import (
    USERS,
    FakeClever,
    Scripted,
    next_repeats,
    next_to,
    without_data,
)
from tests.support.scenario import DISTRICT, KIM, MARIA, RIVERA, S1, S2, S3, STEVE, example
from tests.support.stack import OPS_TOKEN, running_stack, wait_until
from worker.api import app
from worker.clever import DistrictToken
from worker.cli import main
from worker.db import make_engine, session_scope
from worker.sync import SyncOptions, sync_district

TOKEN = "district-token-1"
DANA = "5f8e2c1a9b7d4e0012ab0004"  # a counselor: staff only


@dataclass
class Env:
    clever: FakeClever
    token: DistrictToken
    options: SyncOptions

    def sync(self, *, dry_run: bool = False) -> Any:
        return sync_district(self.token, self.options, dry_run=dry_run, trigger="test")


@pytest.fixture
def env(configure: Configure, database_url: str) -> Iterator[Env]:
    with FakeClever() as clever:
        configure(
            DATABASE_URL=database_url,
            BROKER_URL=CLOSED_BROKER,
            CLEVER_API_BASE=clever.url,
            CLEVER_DISTRICT_TOKENS=f"{DISTRICT}:{TOKEN}",
            OPS_TOKEN=OPS_TOKEN,
        )
        clever.roster(DISTRICT, TOKEN, example())
        options = SyncOptions(base_url=clever.url, attempts=3, backoff=0.01, backoff_max=0.02)
        yield Env(clever, DistrictToken(DISTRICT, TOKEN), options)


def seed() -> None:
    with session_scope() as session:
        load_snapshot(session, example())


def footprint() -> dict[str, Any]:
    """Row counts and the latest change of what a sync may write."""
    with session_scope() as session:
        found: dict[str, Any] = {}
        for model in (Account, Class, ClassTeacher, Enrollment, RosterUser, RosterEvent):
            found[model.__tablename__] = session.scalar(select(func.count()).select_from(model))
        for model in (Account, Class, RosterUser):
            found[f"{model.__tablename__}.updated_at"] = session.scalar(
                select(func.max(model.updated_at))
            )
        live = [Enrollment.removed_by.is_(None)]
        found["live enrollments"] = session.scalar(
            select(func.count()).select_from(Enrollment).where(*live)
        )
    return found


def inbox() -> dict[str, RosterEvent]:
    with session_scope() as session:
        return {ev.id: ev for ev in session.scalars(select(RosterEvent))}


def apply_inbox(brake_percent: float = 100.0) -> dict[str, str]:
    """What the workers would do: every accepted event, in Clever order."""
    with session_scope() as session:
        ids = session.scalars(
            select(RosterEvent.id)
            .where(RosterEvent.status == EventStatus.ACCEPTED)
            .order_by(RosterEvent.occurred_at, RosterEvent.id)
        ).all()
    limits = events.Limits(brake_percent=brake_percent)
    outcome: dict[str, str] = {}
    for event_id in ids:
        with session_scope() as session:
            routed = events.process_event(session, event_id, limits)
            assert routed is not None
            outcome[event_id] = routed.status
    return outcome


def view(account_id: str) -> dict[str, Any]:
    with session_scope() as session:
        return account_view(session, account_id)


# --------------------------------------------------------------------------------------------
# Agreeing with the seed, and bootstrap


def test_syncing_the_data_a_seed_loaded_reports_no_change_and_writes_nothing(env: Env) -> None:
    seed()
    before = footprint()
    report = env.sync()
    assert report.as_dict() == {
        "district": DISTRICT,
        "sync_id": report.sync_id,
        "status": "done",
        "reason": None,
        "pulled": {"users": 8, "sections": 3},
        "changes": dict.fromkeys(
            [
                "users_created",
                "users_updated",
                "users_deleted",
                "roles_lost",
                "sections_created",
                "sections_updated",
                "sections_deleted",
            ],
            0,
        ),
        "held": 0,
    }
    assert footprint() == before


def test_a_district_unknown_to_the_mirror_is_bootstrapped_from_the_pull(env: Env) -> None:
    report = env.sync()
    assert report.status == "done"
    assert report.changes["users_created"] == 8 and report.changes["sections_created"] == 3
    with session_scope() as session:
        district = session.get(District, DISTRICT)
        assert district is not None and district.admin_removal == "convert"
        # Staff and contacts are kept in the mirror; only platform roles make an account.
        assert session.get(RosterUser, DANA) is not None
        assert session.get(Account, DANA) is None
    steve = view(STEVE)
    assert steve["kind"] == "district"
    assert {c["id"] for c in steve["classes"] if c["district_synced"]} == {S1, S2}
    assert KIM in steve["coaches"]
    assert inbox() == {}
    # And a second sync finds nothing more to do.
    again = env.sync()
    assert sum(again.changes.values()) == 0


# --------------------------------------------------------------------------------------------
# Destructive changes go through the inbox


def test_destructive_changes_are_recorded_as_the_clever_events_they_stand_for(env: Env) -> None:
    seed()
    env.clever.remove_users(DISTRICT, STEVE)
    env.clever.drop_role(DISTRICT, RIVERA, "district_admin")
    env.clever.remove_sections(DISTRICT, S3)
    env.clever.shrink_section(DISTRICT, S1, students=[MARIA])
    report = env.sync()
    assert report.status == "done"
    assert report.changes["users_deleted"] == 1
    assert report.changes["roles_lost"] == 1
    assert report.changes["sections_deleted"] == 1
    assert report.changes["sections_updated"] == 1
    stored = inbox()
    sid = report.sync_id
    assert set(stored) == {
        f"sync:{sid}:users.deleted:{STEVE}",
        f"sync:{sid}:users.updated:{RIVERA}",
        f"sync:{sid}:sections.deleted:{S3}",
        f"sync:{sid}:sections.updated:{S1}",
    }
    assert {ev.source for ev in stored.values()} == {"sync"}
    assert {ev.status for ev in stored.values()} == {"accepted"}
    assert {ev.occurred_at for ev in stored.values()} == {report.started_at}
    # Nothing changed yet: the rules apply them, one event at a time.
    assert view(STEVE)["kind"] == "district"
    assert set(apply_inbox().values()) == {"done"}
    steve, rivera, maria = view(STEVE), view(RIVERA), view(MARIA)
    assert steve["kind"] == "grassroots" and not any(c["district_synced"] for c in steve["classes"])
    assert rivera["roles"] == ["teacher"] and rivera["district_reports"] == "denied"
    assert S1 not in {c["id"] for c in maria["classes"]}
    assert S3 not in {c["id"] for c in rivera["classes"]}
    # Applied, the district is as Clever lists it: a second sync finds nothing to change.
    assert sum(env.sync().changes.values()) == 0


def test_a_shrink_names_only_members_the_pull_still_lists(env: Env) -> None:
    seed()
    # Steve leaves the roster, so every section too; his removal is held by the brake.
    env.clever.remove_users(DISTRICT, STEVE)
    report = env.sync()
    assert report.changes["users_deleted"] == 1 and report.changes["sections_updated"] == 0
    assert report.held == 0
    outcome = apply_inbox(brake_percent=0.0001)
    assert outcome == {f"sync:{report.sync_id}:users.deleted:{STEVE}": "done"}
    # At least one removal a day is always allowed; a second absentee is held, and keeps all.
    env.clever.remove_users(DISTRICT, MARIA)
    second = env.sync()
    assert second.held == 1
    assert apply_inbox(brake_percent=0.0001) == {
        f"sync:{second.sync_id}:users.deleted:{MARIA}": "held"
    }
    assert S1 in {c["id"] for c in view(MARIA)["classes"]}


def test_a_dry_run_reports_the_changes_and_applies_nothing(env: Env) -> None:
    seed()
    env.clever.remove_users(DISTRICT, STEVE)
    env.clever.put_users(
        DISTRICT,
        {
            "id": "58c81dcea3627927150009aa",
            "district": DISTRICT,
            "name": {"first": "New", "last": "Student"},
            "roles": {"student": {}},
        },
    )
    before = footprint()
    report = env.sync(dry_run=True)
    assert report.changes["users_deleted"] == 1 and report.changes["users_created"] == 1
    assert footprint() == before
    with session_scope() as session:
        row = session.get(RosterSync, report.sync_id)
        assert row is not None and row.dry_run and row.status == "done"
        assert row.changes["users_deleted"] == 1


# --------------------------------------------------------------------------------------------
# A pull that did not complete applies nothing


FAULTS = {
    "server error after retries": [Scripted(status=503, path=USERS)] * 3,
    "token refused": [Scripted(status=401, path=USERS)],
    # A page Clever garbled may be a passing fault: tried again, then the sync fails.
    "not JSON": [Scripted(raw=b"<html>oops</html>", path=USERS)] * 3,
    "no data": [Scripted(edit=without_data, path=USERS)] * 3,
    "repeats a cursor": [Scripted(edit=next_repeats, path=USERS)],
    "links to another host": [
        Scripted(edit=next_to("http://elsewhere.example/v3.0/users"), path=USERS)
    ],
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_pull_that_did_not_complete_applies_nothing(env: Env, fault: str) -> None:
    seed()
    env.clever.remove_users(DISTRICT, STEVE)
    env.clever.script(DISTRICT, *FAULTS[fault])
    before = footprint()
    report = env.sync()
    assert report.status == "failed" and report.reason
    assert footprint() == before
    with session_scope() as session:
        row = session.get(RosterSync, report.sync_id)
        assert row is not None and (row.status, row.reason) == ("failed", report.reason)
        assert session.get(PollCursor, DISTRICT) is None  # the feed position is not moved


def test_a_page_with_a_value_the_database_cannot_store_fails_the_sync_naming_it(
    env: Env,
) -> None:
    seed()
    env.clever.update_user(DISTRICT, STEVE, name={"first": "Steve\x00", "last": "Ng"})
    env.clever.remove_users(DISTRICT, MARIA)
    before = footprint()
    report = env.sync()
    assert report.status == "failed"
    assert f"(id {STEVE}): name.first: contains a NUL character" in report.reason
    assert "Steve" not in report.reason
    assert footprint() == before  # not even Maria's removal, found on the same pull


def test_an_empty_roster_for_a_district_with_accounts_is_refused(env: Env) -> None:
    seed()
    env.clever.remove_users(DISTRICT, *env.clever.user_ids(DISTRICT))
    before = footprint()
    report = env.sync()
    assert (report.status, report.reason) == ("failed", "empty_roster")
    assert footprint() == before


def test_rate_limits_and_a_passing_server_error_are_ridden_out(env: Env) -> None:
    seed()
    env.clever.script(
        DISTRICT,
        Scripted(status=429, reset_in=0.2, path=USERS),
        Scripted(status=502, path=USERS),
    )
    assert env.sync().status == "done"


def test_the_pull_reads_pages_of_ten_thousand_to_the_empty_page(env: Env) -> None:
    seed()
    env.sync()
    users = env.clever.requests(DISTRICT, USERS)
    assert [r.query.get("limit") for r in users] == ["10000", "10000"]
    assert users[-1].query.get("starting_after")


# --------------------------------------------------------------------------------------------
# The feed position


def test_polling_resumes_from_the_feed_position_recorded_before_the_pull(env: Env) -> None:
    seed()
    env.clever.add(DISTRICT, *(clever_event(f"evt-{n}") for n in range(3)))
    report = env.sync()
    with session_scope() as session:
        row = session.get(RosterSync, report.sync_id)
        cursor = session.get(PollCursor, DISTRICT)
        assert row is not None and row.feed_position == "evt-2"
        assert cursor is not None and (cursor.cursor, cursor.status) == ("evt-2", "ok")


def clever_event(
    event_id: str, type_: str = "schools.updated", obj: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "id": event_id,
        "type": type_,
        "created": "2026-11-01T00:00:00Z",
        "data": {"object": obj or {"id": "school-1"}},
    }


# --------------------------------------------------------------------------------------------
# The operator's side


def test_sync_json_prints_one_object_per_district_and_fails_with_status_1(env: Env) -> None:
    seed()
    runner = CliRunner()
    done = runner.invoke(main, ["sync", "--json"])
    assert done.exit_code == 0, done.output
    assert '"status": "done"' in done.stdout
    env.clever.script(DISTRICT, Scripted(status=401, path=USERS))
    failed = runner.invoke(main, ["sync", DISTRICT, "--json"])
    assert failed.exit_code == 1
    assert '"status": "failed"' in failed.stdout
    unknown = runner.invoke(main, ["sync", "no-such-district"])
    assert unknown.exit_code == 2


def test_district_policy_is_set_by_an_operator(env: Env) -> None:
    seed()
    result = CliRunner().invoke(main, ["district", "policy", DISTRICT, "--admin-removal", "remove"])
    assert result.exit_code == 0, result.output
    with session_scope() as session:
        district = session.get(District, DISTRICT)
        assert district is not None and district.admin_removal == "remove"


def test_ops_api_reports_the_last_sync_and_status_names_failing_districts(env: Env) -> None:
    seed()
    env.clever.script(DISTRICT, Scripted(status=401, path=USERS))
    report = env.sync()
    client = TestClient(app)
    headers = {"authorization": f"Bearer {OPS_TOKEN}"}
    last = client.get(f"/ops/districts/{DISTRICT}/sync", headers=headers)
    assert last.status_code == 200
    assert last.json()["sync_id"] == report.sync_id and last.json()["status"] == "failed"
    assert last.json()["started_at"] and last.json()["finished_at"]
    status = client.get("/ops/status", headers=headers).json()
    assert status["districts"]["sync_failed"] == [DISTRICT]
    unknown = client.post("/ops/districts/no-such-district/sync", headers=headers)
    assert unknown.status_code == 409


# --------------------------------------------------------------------------------------------
# Without an operator


@pytest.mark.slow
def test_a_lost_cursor_is_resynced_without_an_operator_and_polling_resumes(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    url = pg_databases.new()
    roster = tmp_path / "district.json"
    roster.write_text(json.dumps(example()))
    with FakeClever() as clever:
        clever.roster(DISTRICT, TOKEN, example())
        clever.add(DISTRICT, *(clever_event(f"evt-{n}") for n in range(3)))
        clever.expire(DISTRICT, 2)  # evt-0 and evt-1 have left Clever's 30-day window
        with running_stack(
            tmp_path,
            url,
            seed=roster,
            beat=True,
            CLEVER_API_BASE=clever.url,
            CLEVER_DISTRICT_TOKENS=f"{DISTRICT}:{TOKEN}",
            POLL_INTERVAL="1",
            SYNC_INTERVAL="0",
        ) as stack:
            engine = make_engine(url)
            with Session(engine) as session, session.begin():
                now = datetime.now(UTC)
                session.add(
                    PollCursor(
                        district_id=DISTRICT,
                        cursor="evt-0",
                        started_at=now,
                        last_success_at=now,
                        token_sha256=DistrictToken(DISTRICT, TOKEN).fingerprint,
                    )
                )

            def resynced() -> tuple[str, str | None] | None:
                with Session(engine) as session:
                    done = session.scalar(
                        select(RosterSync).where(
                            RosterSync.trigger == "resync", RosterSync.status == "done"
                        )
                    )
                    cursor = session.get(PollCursor, DISTRICT)
                    if done is None or cursor is None:
                        return None
                    return cursor.status, cursor.cursor

            assert wait_until(resynced, timeout=60, what="the resync") == ("ok", "evt-2")
            # Polling goes on from the position the sync recorded.
            clever.add(
                DISTRICT,
                clever_event("evt-3", "users.deleted", {"id": STEVE, "district": DISTRICT}),
            )
            wait_until(
                lambda: stack.account(STEVE)["kind"] == "grassroots",
                timeout=60,
                what="the event after the sync's position, polled and applied",
            )
            engine.dispose()
