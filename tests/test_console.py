"""The operators' console over HTTP (SPEC §5.9): the real app (TestClient), a real database with
the example district, two operators made as ``grassroots operator add`` makes them. The same
pages in a real browser against a real stack: ``tests/test_console_browser.py``."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from models import AuditRecord, OperatorRole, Pause, RosterEvent, utcnow
from tasks import operators
from tasks.conversion import convert_account
from tasks.roster import load_snapshot
from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.dead import dead_event
from tests.support.scenario import DISTRICT, STEVE, example
from tests.support.stack import OPS_TOKEN
from worker import db
from worker.api import app
from worker.console import STATIC, auth
from worker.listeners import record

HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
PAGES = [
    "/console/events",
    "/console/events/evt-dead",
    "/console/dead",
    "/console/held",
    "/console/pauses",
    f"/console/districts/{DISTRICT}",
    f"/console/accounts/{STEVE}",
    "/console/audit",
]
CHANGE_BUTTONS = [
    "Replay",
    "Replay all",
    "Release",
    "Discard",
    "Remove",
    "Add pause",
    "Start exit",
    "Resume",
    "Restore",
    "Save policy",
]


@pytest.fixture
def tokens(configure: Configure, database_url: str) -> dict[str, str]:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=OPS_TOKEN)
    with db.session_scope() as session:
        load_snapshot(session, example())
        made = {
            "ada": operators.add(session, "ada", OperatorRole.OPERATOR, by="test"),
            "vic": operators.add(session, "vic", OperatorRole.VIEWER, by="test"),
        }
        dead_event(session, "evt-dead", "KeyError", error="'x'")
        for n in (1, 2):
            session.add(
                RosterEvent(
                    id=f"evt-held-{n}",
                    type="users.deleted",
                    payload={},
                    status="held",
                    district_id=DISTRICT,
                )
            )
    return made


@pytest.fixture(autouse=True)
def fresh_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "THROTTLE", operators.Throttle())
    from worker.console import pages

    monkeypatch.setattr(pages, "THROTTLE", auth.THROTTLE)


@pytest.fixture
def web() -> Iterator[TestClient]:
    with TestClient(app, follow_redirects=False) as client:
        yield client


def sign_in(client: TestClient, name: str, token: str) -> httpx.Response:
    response: httpx.Response = client.post("/console/sign-in", data={"name": name, "token": token})
    return response


def csrf_of(client: TestClient, path: str = "/console/") -> str:
    found = CSRF.search(client.get(path).text)
    assert found, "no CSRF token on the page"
    return found.group(1)


@pytest.fixture
def ada(web: TestClient, tokens: dict[str, str]) -> TestClient:
    assert sign_in(web, "ada", tokens["ada"]).status_code == 303
    return web


@pytest.fixture
def vic(web: TestClient, tokens: dict[str, str]) -> TestClient:
    assert sign_in(web, "vic", tokens["vic"]).status_code == 303
    return web


def status_of(event_id: str) -> str:
    with db.session_scope() as session:
        found = session.get(RosterEvent, event_id)
        assert found is not None
        return found.status


def audit_triggers(action: str) -> list[str]:
    with db.session_scope() as session:
        return list(
            session.scalars(select(AuditRecord.trigger).where(AuditRecord.action == action))
        )


def h1(html: str) -> str:
    found = re.search(r"<h1>(.*?)</h1>", html, re.S)
    assert found, html
    return found.group(1)


# --------------------------------------------------------------------------------------------
# Signing in and out


def test_the_vendored_htmx_is_the_pinned_file() -> None:
    assert hashlib.sha256((STATIC / "htmx.min.js").read_bytes()).hexdigest() == HTMX_SHA256


@pytest.mark.parametrize("path", ["/console/", *PAGES])
def test_every_page_sends_a_signed_out_visitor_to_sign_in(
    web: TestClient, tokens: dict[str, str], path: str
) -> None:
    response = web.get(path)
    if path == "/console/":
        assert response.status_code == 200
        assert h1(response.text) == "Sign in"
        for label in ('for="name">Name<', 'for="token">Token<', ">Sign in</button>"):
            assert label in response.text
    else:
        assert (response.status_code, response.headers["location"]) == (303, "/console/")


def test_a_wrong_name_and_a_wrong_token_get_one_message(
    web: TestClient, tokens: dict[str, str]
) -> None:
    wrong_token = sign_in(web, "ada", tokens["vic"])
    wrong_name = sign_in(web, "nobody", tokens["ada"])

    assert wrong_token.status_code == wrong_name.status_code == 401
    assert "Wrong name or token." in wrong_token.text
    assert wrong_token.text == wrong_name.text
    assert "set-cookie" not in wrong_token.headers


def test_the_session_cookie_is_httponly_strict_and_secure_over_https(
    tokens: dict[str, str],
) -> None:
    for base, secure in (("http://testserver", False), ("https://testserver", True)):
        with TestClient(app, base_url=base, follow_redirects=False) as client:
            response = sign_in(client, "ada", tokens["ada"])
        cookie = response.headers["set-cookie"]
        assert response.status_code == 303 and response.headers["location"] == "/console/"
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
        assert ("Secure" in cookie) == secure


def test_repeated_failures_are_slowed_even_for_the_right_token(
    web: TestClient, tokens: dict[str, str]
) -> None:
    for _ in range(auth.THROTTLE.free):
        assert sign_in(web, "ada", "wrong").status_code == 401

    slowed = sign_in(web, "ada", tokens["ada"])

    assert slowed.status_code == 429
    assert "Too many failed sign-ins" in slowed.text


def test_signing_in_and_failing_logs_no_name_nor_token(
    web: TestClient, tokens: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        sign_in(web, "ada", "wrong")
        sign_in(web, "ada", tokens["ada"])
        web.get("/console/")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "ada" not in logged and tokens["ada"] not in logged


def test_sign_out_ends_the_session(ada: TestClient) -> None:
    cookie = ada.cookies.get(auth.COOKIE)
    assert h1(ada.get("/console/").text) == "Overview"

    signed_out = ada.post("/console/sign-out", data={"csrf": csrf_of(ada)})

    assert signed_out.status_code == 303
    ada.cookies.set(auth.COOKIE, cookie or "", path="/console")
    assert ada.get("/console/events").headers["location"] == "/console/"


# --------------------------------------------------------------------------------------------
# Pages


def test_every_page_names_itself_in_its_h1(ada: TestClient) -> None:
    headings = [h1(ada.get(path).text) for path in ["/console/", *PAGES]]
    assert headings[:6] == [
        "Overview",
        "Events",
        "Event evt-dead",
        "Dead letters",
        "Held",
        "Pauses",
    ]
    assert headings[6].startswith("District ") and DISTRICT in headings[6]
    assert headings[7:] == [f"Account {STEVE}", "Audit"]


def test_the_overview_refreshes_only_its_live_block(ada: TestClient) -> None:
    fragment = ada.get("/console/", headers={"HX-Request": "true"}).text
    assert fragment.lstrip().startswith('<section id="live"')
    assert "<h1>" not in fragment and "Pending" in fragment


def test_the_overview_links_to_flower_where_the_stack_recorded_it(
    ada: TestClient, configure: Configure, tmp_path: Path
) -> None:
    assert 'href="http://testserver:5555/"' in ada.get("/console/").text
    record(tmp_path, {"flower": "http://127.0.0.1:5601"})
    configure(GRASSROOTS_HOME=str(tmp_path))
    assert 'href="http://127.0.0.1:5601/"' in ada.get("/console/").text


def test_the_events_list_pages_by_key_newest_first(ada: TestClient) -> None:
    with db.session_scope() as session:
        now = utcnow()
        for n in range(60):
            session.add(
                RosterEvent(
                    id=f"evt-{n:03}",
                    type="users.updated",
                    payload={},
                    status="done",
                    received_at=now + timedelta(seconds=n),
                )
            )
    first = ada.get("/console/events?status=done").text
    ids = re.findall(r">(evt-\d{3})</a>", first)
    assert ids == [f"evt-{n:03}" for n in range(59, 9, -1)]
    older = re.search(r'href="([^"]+)" rel="next"', first)
    assert older
    second = ada.get(older.group(1).replace("&amp;", "&")).text
    assert re.findall(r">(evt-\d{3})</a>", second) == [f"evt-{n:03}" for n in range(9, -1, -1)]


def test_an_operator_replays_a_dead_event_and_the_audit_names_them(ada: TestClient) -> None:
    page = ada.get("/console/events/evt-dead").text
    assert ">Replay</button>" in page and "KeyError: &#39;x&#39;" in page

    response = ada.post("/console/events/evt-dead/replay", data={"csrf": csrf_of(ada)})

    assert (response.status_code, response.headers["location"]) == (
        303,
        "/console/events/evt-dead",
    )
    assert status_of("evt-dead") == "accepted"
    assert audit_triggers("replay") == ["operator:ada:console:replay"]
    after = ada.get("/console/events/evt-dead").text
    assert "Replayed." in after and ">Replay</button>" not in after
    assert ">ada</td>" in ada.get("/console/audit").text


def test_an_events_page_shows_the_event_as_received(ada: TestClient) -> None:
    raw = {"id": "evt-p", "type": "users.deleted", "data": {"object": {"id": STEVE}}}
    with db.session_scope() as session:
        session.add(RosterEvent(id="evt-p", type="users.deleted", payload=raw, status="done"))
    page = ada.get("/console/events/evt-p").text
    assert "The event as received" in page and '"type": "users.deleted"' in page


def test_replay_all_confirms_the_count_and_sends_only_those(ada: TestClient) -> None:
    confirm = ada.get(
        "/console/dead/confirm", params={"task": "grassroots.process_event", "error": "KeyError"}
    ).text
    assert "Replay 1 dead events" in confirm and "Confirm: Replay all 1" in confirm
    up_to = re.search(r'name="up_to" value="(\d+)"', confirm)
    assert up_to
    with db.session_scope() as session:  # dies after the confirmation was shown
        dead_event(session, "evt-late", "KeyError")

    ada.post(
        "/console/dead/replay",
        data={
            "csrf": csrf_of(ada),
            "task": "grassroots.process_event",
            "error": "KeyError",
            "up_to": up_to.group(1),
        },
    )

    assert (status_of("evt-dead"), status_of("evt-late")) == ("accepted", "dead")
    assert "Replayed 1 dead events." in ada.get("/console/dead").text


def test_held_removals_are_released_after_a_confirmation_naming_the_count(
    ada: TestClient,
) -> None:
    confirm = ada.get(f"/console/held/{DISTRICT}/release").text
    assert "Release 2 held removals" in confirm

    ada.post(
        f"/console/held/{DISTRICT}/release",
        data={"csrf": csrf_of(ada), "event": ["evt-held-1", "evt-held-2"]},
    )

    assert (status_of("evt-held-1"), status_of("evt-held-2")) == ("accepted", "accepted")
    assert audit_triggers("release") == ["operator:ada:console:release"] * 2


def test_a_pause_is_added_and_removed(ada: TestClient) -> None:
    ada.post(
        "/console/pauses",
        data={"csrf": csrf_of(ada), "district": DISTRICT, "until": "2099-01-04", "reason": "x"},
    )
    with db.session_scope() as session:
        pause = session.scalars(select(Pause)).one()
        pause_id, district = pause.id, pause.district_id
    assert district == DISTRICT
    assert "Remove pause" in ada.get("/console/pauses").text

    ada.post(f"/console/pauses/{pause_id}/remove", data={"csrf": csrf_of(ada)})

    with db.session_scope() as session:
        assert session.get(Pause, pause_id).removed_at is not None  # type: ignore[union-attr]
    assert audit_triggers("pause_remove") == ["operator:ada:console:pause-remove"]


def test_a_bad_pause_is_refused_with_a_message(ada: TestClient) -> None:
    response = ada.post("/console/pauses", data={"csrf": csrf_of(ada), "until": "someday"})
    assert response.status_code == 303
    assert "Refused" in ada.get("/console/pauses").text


def test_the_district_policy_form_changes_the_policy(ada: TestClient) -> None:
    ada.post(
        f"/console/districts/{DISTRICT}/policy",
        data={"csrf": csrf_of(ada), "admin_removal": "remove", "brake_percent": "25"},
    )
    page = ada.get(f"/console/districts/{DISTRICT}").text
    assert "Policy saved." in page and ">remove</td>" in page and ">25.0</td>" in page


def test_the_exit_confirmation_names_the_accounts_of_each_role(ada: TestClient) -> None:
    confirm = ada.get(f"/console/districts/{DISTRICT}/exit").text
    assert "Confirm: Start exit" in confirm
    for role in ("admin", "teacher", "student"):
        assert re.search(rf"<li>\d+ {role}s?", confirm), role


def test_an_account_converted_by_an_event_is_restored(ada: TestClient) -> None:
    with db.session_scope() as session:
        convert_account(session, STEVE, trigger="test")
    page = ada.get(f"/console/accounts/{STEVE}").text
    assert ">grassroots</td>" in page and ">Restore</button>" in page

    ada.post(f"/console/accounts/{STEVE}/restore", data={"csrf": csrf_of(ada)})

    page = ada.get(f"/console/accounts/{STEVE}").text
    assert ">district</td>" in page and "Restored" in page
    assert audit_triggers("restore") == ["operator:ada:console:restore"]


def test_an_unknown_subject_is_a_404_page(ada: TestClient) -> None:
    response = ada.get("/console/events/no-such-event")
    assert response.status_code == 404 and h1(response.text) == "Not found"


# --------------------------------------------------------------------------------------------
# Changes refused


def test_a_viewer_sees_no_change_button_on_any_page(vic: TestClient) -> None:
    with db.session_scope() as session:
        convert_account(session, STEVE, trigger="test")
    for path in ["/console/", *PAGES, f"/console/districts/{DISTRICT}/exit"]:
        page = vic.get(path).text
        buttons = re.findall(r"<button[^>]*>([^<]*)</button>", page)
        assert set(buttons) <= {"Find account", "Sign out", "Filter"}, (path, buttons)


FORGED = [
    ("/console/events/evt-dead/replay", {}),
    ("/console/dead/replay", {"task": "grassroots.process_event", "error": "KeyError", "up_to": 9}),
    (f"/console/held/{DISTRICT}/release", {"event": "evt-held-1"}),
    ("/console/pauses", {"until": "2099-01-01"}),
    (f"/console/districts/{DISTRICT}/exit", {}),
    (f"/console/districts/{DISTRICT}/policy", {"admin_removal": "remove"}),
    (f"/console/accounts/{STEVE}/restore", {}),
]


def _nothing_changed() -> None:
    assert status_of("evt-dead") == "dead" and status_of("evt-held-1") == "held"
    with db.session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Pause)) == 0
        assert (
            session.scalar(
                select(func.count())
                .select_from(AuditRecord)
                .where(AuditRecord.action != "operator-add")
            )
            == 0
        )


@pytest.mark.parametrize(("path", "data"), FORGED, ids=[p for p, _ in FORGED])
def test_a_viewers_post_is_403_and_changes_nothing(
    vic: TestClient, path: str, data: dict[str, object]
) -> None:
    response = vic.post(path, data={"csrf": csrf_of(vic), **data})
    assert response.status_code == 403
    assert h1(response.text) == "Forbidden"
    _nothing_changed()


@pytest.mark.parametrize(("path", "data"), FORGED, ids=[p for p, _ in FORGED])
def test_a_post_without_the_sessions_csrf_token_is_403(
    ada: TestClient, path: str, data: dict[str, object]
) -> None:
    assert ada.post(path, data=data).status_code == 403
    assert ada.post(path, data={"csrf": "forged", **data}).status_code == 403
    _nothing_changed()


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "https://evil.example"}, {"Referer": "https://evil.example/page"}],
    ids=["origin", "referer"],
)
def test_a_post_from_another_site_is_403_even_with_the_token(
    ada: TestClient, headers: dict[str, str]
) -> None:
    response = ada.post(
        "/console/events/evt-dead/replay", data={"csrf": csrf_of(ada)}, headers=headers
    )
    assert response.status_code == 403
    _nothing_changed()
    own = ada.post(
        "/console/events/evt-dead/replay",
        data={"csrf": csrf_of(ada)},
        headers={"Origin": "http://testserver"},
    )
    assert own.status_code == 303 and status_of("evt-dead") == "accepted"


def test_a_post_with_no_session_is_403(web: TestClient, tokens: dict[str, str]) -> None:
    assert web.post("/console/events/evt-dead/replay", data={"csrf": "x"}).status_code == 403
    _nothing_changed()


def test_removing_an_operator_signs_them_out_at_once(ada: TestClient) -> None:
    with db.session_scope() as session:
        operators.remove(session, "ada", by="test")
    assert ada.get("/console/events").headers["location"] == "/console/"
