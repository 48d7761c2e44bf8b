"""The ops API's account routes, SPEC §5.4: the account view by Clever id or platform id, in the
SPEC's shape, and who may open district reports.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tasks import conversion, exits
from tasks.view import DISTRICT_ACCESS_ENDED
from tests.support.app_env import assert_error
from tests.support.ops_api import TRIGGER, get, seed
from tests.support.scenario import DISTRICT, KIM, MARIA, PAT, PEOPLE, RIVERA, S1, S2, SAM, STEVE
from worker import db

VIEW_KEYS = {
    "id",
    "clever_id",
    "email",
    "kind",
    "status",
    "roles",
    "district",
    "district_reports",
    "classes",
    "goals",
    "assignments",
    "coaches",
    "students",
    "progress",
}


# --------------------------------------------------------------------------------------------
# Account view (SPEC §5.4)


def test_account_view_by_clever_id_is_the_spec_shape(seeded: TestClient) -> None:
    response = get(seeded, f"/ops/accounts/{STEVE}")

    assert response.status_code == 200
    assert response.json() == {
        "id": STEVE,
        "clever_id": STEVE,
        "email": "s.ziemann@students.example-isd.org",
        "kind": "district",
        "status": "active",
        "roles": ["student"],
        "district": DISTRICT,
        "district_reports": "denied",
        "classes": [
            {"id": S1, "name": "Grade 5 Math - Period 1", "district_synced": True},
            {"id": S2, "name": "Grade 5 Math - Period 2 (co-taught)", "district_synced": True},
            {"id": "class-math-club", "name": "After-school Math Club", "district_synced": False},
        ],
        "goals": [
            {"id": "goal-club-fractions", "class": "class-math-club"},
            {"id": "goal-g5-math", "class": S1},
        ],
        "assignments": [{"id": "asg-p2-decimals", "class": S2}],
        "coaches": [RIVERA, KIM],
        "students": [],
        "progress": [
            {"skill": "add-fractions", "points": 450, "mastery": "mastered"},
            {"skill": "decimals-intro", "points": 120, "mastery": "familiar"},
            {"skill": "place-value", "points": 300, "mastery": "proficient"},
        ],
    }


def test_account_view_by_platform_id_is_the_spec_shape(seeded: TestClient) -> None:
    response = get(seeded, f"/ops/accounts/{SAM}")

    assert response.status_code == 200
    assert response.json() == {
        "id": SAM,
        "clever_id": None,
        "email": "sam.taylor@example.com",
        "kind": "grassroots",
        "status": "active",
        "roles": ["teacher"],
        "district": None,
        "district_reports": "denied",
        "classes": [
            {"id": "class-tutoring", "name": "Saturday Tutoring", "district_synced": False}
        ],
        "goals": [],
        "assignments": [{"id": "asg-tutoring-review", "class": "class-tutoring"}],
        "coaches": [],
        "students": [MARIA],
        "progress": [],
    }


def test_every_account_view_has_exactly_the_spec_fields(seeded: TestClient) -> None:
    for person in PEOPLE:
        view = get(seeded, f"/ops/accounts/{person}").json()
        assert set(view) == VIEW_KEYS
        assert view["id"] == person
        assert all(set(c) == {"id", "name", "district_synced"} for c in view["classes"])
        assert all(set(g) == {"id", "class"} for g in view["goals"] + view["assignments"])
        assert all(set(p) == {"skill", "points", "mastery"} for p in view["progress"])
        assert view["roles"] == sorted(view["roles"])


def test_unknown_account_is_404(seeded: TestClient) -> None:
    assert_error(get(seeded, "/ops/accounts/5f8e2c1a9b7d4e00deadbeef"), 404, "not_found")


# --------------------------------------------------------------------------------------------
# District reports


@pytest.mark.parametrize("admin", [PAT, RIVERA])
def test_active_district_admin_may_open_district_reports(seeded: TestClient, admin: str) -> None:
    response = get(seeded, f"/ops/accounts/{admin}/district-reports")

    assert response.status_code == 200
    assert response.json() == {"account": admin, "district": DISTRICT, "access": "allowed"}


def test_district_teacher_who_is_not_an_admin_is_refused_district_reports(
    seeded: TestClient,
) -> None:
    response = get(seeded, f"/ops/accounts/{KIM}/district-reports")

    assert_error(response, 403)
    assert response.json()["error"] != "district_access_ended"


def test_converted_admin_gets_district_access_ended(seeded: TestClient) -> None:
    with db.session_scope() as session:
        conversion.convert_account(session, PAT, trigger=TRIGGER)

    response = get(seeded, f"/ops/accounts/{PAT}/district-reports")

    assert_error(response, 403, "district_access_ended")
    assert response.json()["message"] == DISTRICT_ACCESS_ENDED
    assert get(seeded, f"/ops/accounts/{PAT}").json()["district_reports"] == "denied"


@pytest.mark.parametrize("admin", [PAT, RIVERA])
def test_admins_get_district_access_ended_after_exit_with_remove_policy(
    client: TestClient, admin: str
) -> None:
    seed("remove")
    with db.session_scope() as session:
        exits.run_in_process(session, DISTRICT, trigger=TRIGGER)

    response = get(client, f"/ops/accounts/{admin}/district-reports")

    assert_error(response, 403, "district_access_ended")
    assert response.json()["message"] == DISTRICT_ACCESS_ENDED


def test_district_reports_of_unknown_account_is_404(seeded: TestClient) -> None:
    assert_error(get(seeded, "/ops/accounts/nobody/district-reports"), 404, "not_found")
