"""An account's roles and what it may open never disagree (SPEC §5.1): a role the roster lists
again after a role loss is given back whole, whether a snapshot, a sync or an event lists it."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from tasks import events, reconcile
from tasks.inbox import ingest
from tasks.roster import CleverSection, CleverUser, load_snapshot
from tasks.view import account_view, find_account, reports_allowed
from tests.support.scenario import DISTRICT, RIVERA, example

LIMITS = events.Limits(brake_percent=100.0)


def rivera_loses_admin(session: Session) -> None:
    """The demo's ``users.updated``: Rivera stays a teacher, without ``district_admin``."""
    ingest(
        session,
        {
            "id": "rivera-loses-admin",
            "type": "users.updated",
            "created": "2026-10-01T00:00:00Z",
            "data": {
                "object": {"id": RIVERA, "district": DISTRICT, "roles": {"teacher": {}}},
                "previous_attributes": {"roles": {"teacher": {}, "district_admin": {}}},
            },
        },
        source="webhook",
    )
    events.process_event(session, "rivera-loses-admin", LIMITS)
    assert account_view(session, RIVERA)["roles"] == ["teacher"]


def assert_admin_with_reports(session: Session, account_id: str) -> None:
    view = account_view(session, account_id)
    assert (view["roles"], view["kind"], view["status"]) == (
        ["admin", "teacher"],
        "district",
        "active",
    )
    assert view["district_reports"] == "allowed"
    assert reports_allowed(session, find_account(session, account_id))


def test_seeding_again_after_a_role_loss_gives_district_reports_back(session: Session) -> None:
    load_snapshot(session, example())
    rivera_loses_admin(session)
    load_snapshot(session, example())
    assert_admin_with_reports(session, RIVERA)


def test_a_users_updated_giving_the_role_back_gives_district_reports_back(
    session: Session,
) -> None:
    load_snapshot(session, example())
    rivera_loses_admin(session)
    ingest(
        session,
        {
            "id": "rivera-admin-again",
            "type": "users.updated",
            "created": "2026-10-02T00:00:00Z",
            "data": {
                "object": {
                    "id": RIVERA,
                    "district": DISTRICT,
                    "roles": {"teacher": {}, "district_admin": {}},
                },
                "previous_attributes": {"roles": {"teacher": {}}},
            },
        },
        source="webhook",
    )
    events.process_event(session, "rivera-admin-again", LIMITS)
    assert_admin_with_reports(session, RIVERA)


def pull_of(snapshot: dict[str, Any], district_id: str) -> reconcile.Pull:
    """A complete Data API pull of one district, as ``worker.sync`` builds it."""
    users = [CleverUser.model_validate(u) for u in snapshot["users"]]
    sections = [CleverSection.model_validate(s) for s in snapshot["sections"]]
    name = next(d["name"] for d in snapshot["districts"] if d["id"] == district_id)
    return reconcile.Pull(
        district_id=district_id,
        district_name=name,
        users={u.id: reconcile.pulled_user(u) for u in users if u.district == district_id},
        sections={s.id: reconcile.pulled_section(s) for s in sections if s.district == district_id},
        started_at=datetime.now(UTC),
    )


def test_a_sync_listing_the_role_again_gives_district_reports_back(session: Session) -> None:
    roster = example()
    load_snapshot(session, roster)
    rivera_loses_admin(session)
    report = reconcile.reconcile(
        session, pull_of(copy.deepcopy(roster), DISTRICT), "s-1", dry_run=False, brake_percent=10
    )
    assert report.changes["users_updated"] == 1 and report.events == []
    assert_admin_with_reports(session, RIVERA)
