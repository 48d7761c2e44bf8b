"""The ops API's district exit routes, SPEC §5.5: the preview, which changes nothing and counts
what the exit then does, the exit request with the broker down, and the exit's progress.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from models import (
    Account,
    Assignment,
    AuditRecord,
    Class,
    ClassTeacher,
    District,
    Enrollment,
    ExitUnit,
    Goal,
    JournalEntry,
    ReportAccess,
)
from tasks import conversion, exits
from tests.support.app_env import CLOSED_BROKER, Configure, assert_error
from tests.support.ops_api import AUTH, TOKEN, TRIGGER, get, seed
from tests.support.scenario import DISTRICT, PEOPLE
from worker import db
from worker.api import app

# --------------------------------------------------------------------------------------------
# District exit preview


def _world(session: Session) -> dict[str, Any]:
    """Everything a preview must not touch."""

    def count(model: Any, *where: Any) -> int:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

    def removed(model: Any) -> int:
        """Rows no reader sees any more: removed themselves, or hidden with their class."""
        if model is Class or not hasattr(model, "class_id"):
            return count(model, model.removed_by.is_not(None))
        gone = select(Class.id).where(Class.removed_by.is_not(None))
        return count(model, or_(model.removed_by.is_not(None), model.class_id.in_(gone)))

    return {
        "district": session.scalar(select(District.status).where(District.id == DISTRICT)),
        "accounts": session.execute(
            select(Account.id, Account.kind, Account.status, Account.district_id).order_by(
                Account.id
            )
        ).all(),
        "journal": count(JournalEntry),
        "audit": count(AuditRecord),
        "removed": {
            model.__name__: removed(model)
            for model in (Class, Enrollment, ClassTeacher, Goal, Assignment, ReportAccess)
        },
    }


@pytest.mark.parametrize("policy", ["convert", "remove"])
def test_exit_preview_changes_nothing_and_counts_what_the_exit_then_does(
    client: TestClient, policy: str
) -> None:
    seed(policy)
    with db.session_scope() as session:
        world = _world(session)
    views = {p: get(client, f"/ops/accounts/{p}").json() for p in PEOPLE}

    response = get(client, f"/ops/districts/{DISTRICT}/preview")

    assert response.status_code == 200
    preview = response.json()
    with db.session_scope() as session:
        assert _world(session) == world
    assert {p: get(client, f"/ops/accounts/{p}").json() for p in PEOPLE} == views

    with db.session_scope() as session:
        outcome = exits.run_in_process(session, DISTRICT, trigger=TRIGGER)
    with db.session_scope() as session:
        removed = _world(session)["removed"]
    after = {p: get(client, f"/ops/accounts/{p}").json() for p in PEOPLE}

    assert preview["district"] == DISTRICT and preview["policy"] == {"admin_removal": policy}
    assert preview["accounts"] == len(outcome.converted) == 6
    assert preview["classes_removed"] == len(outcome.classes_removed) == removed["Class"] == 3
    assert preview["enrollments_removed"] == removed["Enrollment"]
    assert preview["teacher_links_removed"] == removed["ClassTeacher"]
    assert preview["goals_removed"] == removed["Goal"]
    assert preview["assignments_removed"] == removed["Assignment"]
    assert preview["report_grants_revoked"] == removed["ReportAccess"]
    # The exit stamps classes, not what hangs off them; grants go one by one with their admin.
    assert outcome.links_removed == removed["ReportAccess"]
    for item in preview["per_account"]:
        view = after[item["id"]]
        assert (view["kind"], view["status"]) == (item["kind_after"], item["status_after"])
        if item["status_after"] == "active":
            assert view["roles"] == item["roles_after"]
        assert not any(c["district_synced"] for c in view["classes"])
    for role, counts in preview["roles"].items():
        holders = [p for p, v in views.items() if v["district"] == DISTRICT and role in v["roles"]]
        assert counts["accounts"] == len(holders)
        assert counts["removed"] == sum(after[p]["status"] == "removed" for p in holders)
        assert counts["converted"] == sum(after[p]["status"] == "active" for p in holders)
    assert preview["roles"]["admin"]["removed"] == (1 if policy == "remove" else 0)


def test_exit_preview_of_unknown_district_is_404(seeded: TestClient) -> None:
    assert_error(get(seeded, "/ops/districts/5b2a6f0c8e9d7a00deadbeef/preview"), 404, "not_found")


def test_exit_request_with_the_broker_down_answers_a_json_503(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=TOKEN)
    seed()
    with TestClient(app, headers=AUTH, raise_server_exceptions=False) as client:
        response = client.post(f"/ops/districts/{DISTRICT}/exit")

    assert_error(response, 503)


# --------------------------------------------------------------------------------------------
# District exit progress


def _exit_through_units() -> int:
    """A district exit as the workers run it: planned, every unit run, finished."""
    with db.session_scope() as session:
        exit_id = exits.start_exit(session, DISTRICT, trigger=TRIGGER).exit_id
    with db.session_scope() as session:
        keys = session.scalars(select(ExitUnit.key).where(ExitUnit.exit_id == exit_id)).all()
    for key in keys:
        with db.session_scope() as session:
            exits.run_unit(session, exit_id, key)
    with db.session_scope() as session:
        exits.finish(session, exit_id)
    return exit_id


def test_exit_progress_says_restored_once_a_restore_has_undone_the_exit(
    seeded: TestClient,
) -> None:
    path = f"/ops/districts/{DISTRICT}/exit"
    assert_error(get(seeded, path), 404, "not_found")
    first = _exit_through_units()
    done = get(seeded, path).json()
    assert (done["exit"], done["status"]) == (first, "done")
    assert done["units_done"] == done["units_total"] > 0 and done["units_dead"] == 0

    with db.session_scope() as session:
        conversion.restore(session, DISTRICT, trigger=TRIGGER, retention_days=30)
    restored = get(seeded, path).json()
    # The same exit and its counts, no longer in force.
    assert restored == {**done, "status": "restored"}

    # Exited again: the new exit is the one reported, done.
    again = _exit_through_units()
    assert (get(seeded, path).json()["exit"], get(seeded, path).json()["status"]) == (
        again,
        "done",
    )
    assert again > first
