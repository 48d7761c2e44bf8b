"""The console in a real browser (SPEC §5.9): headless Chromium (Debian's ``chromium``, driven by
Playwright) against a real ``grassroots serve``, worker and beat, Redis and Postgres. Operators
are made with ``grassroots operator add``; pages are found by their headings, labels and button
names, as a person reads them."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from tests.support import scenario
from tests.support.databases import PgDatabases
from tests.support.scenario import Copy
from tests.support.stack import Stack, clever_event, running_stack, wait_until

pytestmark = pytest.mark.slow

# Playwright's own browser download cannot reach its CDN here: the system's Chromium is used
# (.ci/run installs Debian's package when it is absent).
CHROMIUM = "/usr/bin/chromium"
CHANGE_BUTTONS = ["Replay", "Release", "Discard", "Remove", "Add pause", "Start exit", "Resume"]
CHANGE_BUTTONS += ["Restore", "Save policy"]
_tags = (f"{n:04x}" for n in itertools.count(0xC000))


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    # pytest-playwright's own is session-scoped: its event loop would stay running in the main
    # thread for the rest of the run, and every later test that calls asyncio.run() would fail.
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser_context_args() -> dict[str, Any]:
    # The plugin's reads its session-scoped playwright for device presets; no test uses them.
    return {}


@pytest.fixture(scope="module")
def browser(playwright: Playwright, browser_type_launch_args: dict[str, Any]) -> Iterator[Browser]:
    browser = playwright.chromium.launch(**browser_type_launch_args, executable_path=CHROMIUM)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_databases: PgDatabases) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("console-stack"), pg_databases.new(), workers=1, beat=True
    ) as s:
        yield s


@pytest.fixture(scope="module")
def tokens(stack: Stack) -> dict[str, str]:
    return {
        name: stack.cli("operator", "add", name, "--role", role).stdout.strip()
        for name, role in (("ada", "operator"), ("vic", "viewer"))
    }


class District:
    """One test's own copy of the example district, seeded into the shared stack."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.copy = c = Copy(next(_tags))
        path = stack.tmp / f"roster-{c.tag}.json"
        path.write_text(json.dumps(c.data))
        stack.cli("seed", str(path))
        self.id = c(scenario.DISTRICT)

    def leaves(self, who: str) -> str:
        """A ``users.deleted`` for one of the example's people, posted; its event id."""
        uid = self.copy(who)
        user = next(u for u in self.copy.data["users"] if u["id"] == uid)
        event = clever_event(
            f"{self.copy.tag}-leaves-{who[-4:]}",
            "users.deleted",
            user,
            created="2026-12-01T10:00:00Z",
        )
        assert self.stack.post(event).status_code == 202
        return str(event["id"])

    def settles(self, event_id: str, status: str) -> None:
        seen: list[str] = []

        def reached() -> bool:
            seen.append(self.stack.event(event_id)["status"])
            return seen[-1] == status

        try:
            wait_until(reached, timeout=60, what=f"event {event_id} to be {status}")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; it is {seen[-1:]}: {self.stack.event(event_id)}"
            ) from None


@pytest.fixture
def district(stack: Stack) -> District:
    return District(stack)


def refuse_updates(stack: Stack, table: str, ids: list[str], errcode: str) -> str:
    """A trigger that makes the database refuse updates of these rows (a permanent error: the
    task is dead-lettered at once); drop it with ``allow_updates``."""
    name = f"refuse_{table}_{abs(hash(tuple(ids))) % 10**8}"
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" RAISE EXCEPTION 'refused by the test' USING ERRCODE = '{errcode}'; END $$"
        )
        listed = ", ".join(f"'{i}'" for i in ids)
        conn.execute(
            f"CREATE TRIGGER {name} BEFORE UPDATE ON {table} FOR EACH ROW"
            f" WHEN (OLD.id IN ({listed})) EXECUTE FUNCTION {name}()"
        )
    return name


def allow_updates(stack: Stack, table: str, name: str) -> None:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        conn.execute(f"DROP TRIGGER {name} ON {table}")
        conn.execute(f"DROP FUNCTION {name}()")


def sign_in(page: Page, stack: Stack, name: str, token: str) -> None:
    page.goto(f"{stack.base}/console/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("Name").fill(name)
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()


@pytest.fixture
def ada(page: Page, stack: Stack, tokens: dict[str, str]) -> Page:
    sign_in(page, stack, "ada", tokens["ada"])
    return page


def test_an_operator_finds_a_dead_event_replays_it_and_sees_it_done(
    ada: Page, stack: Stack, district: District
) -> None:
    steve = district.copy(scenario.STEVE)
    trigger = refuse_updates(stack, "accounts", [steve], "P0001")
    event_id = district.leaves(scenario.STEVE)
    district.settles(event_id, "dead")

    ada.get_by_role("link", name="Events").click()
    ada.get_by_label("Status").select_option("dead")
    ada.get_by_label("District").fill(district.id)
    ada.get_by_role("button", name="Filter").click()
    ada.get_by_role("link", name=event_id).click()
    expect(ada.get_by_role("heading", name=f"Event {event_id}")).to_be_visible()
    expect(ada.get_by_text("refused by the test").first).to_be_visible()
    allow_updates(stack, "accounts", trigger)
    ada.get_by_role("button", name="Replay").click()

    expect(ada.get_by_role("status")).to_have_text("Replayed.")
    district.settles(event_id, "done")
    ada.reload()
    expect(ada.get_by_role("row", name="Status done")).to_be_visible()
    expect(ada.get_by_role("button", name="Replay")).to_have_count(0)


def test_replay_all_confirms_the_exact_count_then_replays_them(
    ada: Page, stack: Stack, district: District
) -> None:
    students = [district.copy(scenario.MARIA), district.copy(scenario.LEO)]
    trigger = refuse_updates(stack, "accounts", students, "P0004")  # assert_failure
    events = [district.leaves(scenario.MARIA), district.leaves(scenario.LEO)]
    for event_id in events:
        district.settles(event_id, "dead")

    ada.get_by_role("link", name="Dead letters").click()
    group = ada.get_by_role("row").filter(has_text="AssertFailure")
    expect(group.get_by_role("cell", name="2", exact=True)).to_be_visible()
    group.get_by_role("button", name="Replay all").click()
    expect(ada.get_by_text("Replay 2 dead events")).to_be_visible()
    allow_updates(stack, "accounts", trigger)
    ada.get_by_role("button", name="Confirm").click()

    expect(ada.get_by_role("status")).to_have_text("Replayed 2 dead events.")
    for event_id in events:
        district.settles(event_id, "done")


def test_held_removals_are_released_after_a_confirmation(
    ada: Page, stack: Stack, district: District
) -> None:
    stack.cli("district", "policy", district.id, "--brake-percent", "1")
    # The brake lets one removal a day through, whatever the percentage: the second is held.
    district.settles(district.leaves(scenario.STEVE), "done")
    event_id = district.leaves(scenario.LEO)
    district.settles(event_id, "held")

    ada.get_by_role("link", name="Held").click()
    section = ada.get_by_role("region", name=re.compile(district.id))
    expect(section.get_by_text("1 removal waiting")).to_be_visible()
    section.get_by_role("button", name="Release").click()
    expect(ada.get_by_text(f"Release 1 held removals of district {district.id}")).to_be_visible()
    ada.get_by_role("button", name="Confirm").click()

    expect(ada.get_by_role("status")).to_contain_text("Released 1 held removals")
    district.settles(event_id, "done")


def test_a_pause_is_added_and_removed_and_the_audit_names_the_operator(
    ada: Page, stack: Stack, district: District
) -> None:
    ada.get_by_role("link", name="Pauses").click()
    ada.get_by_label("District").select_option(district.id)
    ada.get_by_label("Until").fill("2099-01-04")
    ada.get_by_label("Reason").fill(f"winter break {district.id}")
    ada.get_by_role("button", name="Add pause").click()

    row = ada.get_by_role("row").filter(has_text=f"winter break {district.id}")
    expect(row).to_have_count(1)
    row.get_by_role("button", name="Remove").click()
    expect(ada.get_by_role("status")).to_contain_text("Removed pause")
    expect(ada.get_by_role("row").filter(has_text=f"winter break {district.id}")).to_have_count(0)

    ada.get_by_role("link", name="Audit").click()
    removed = ada.get_by_role("row").filter(has_text="pause_remove").first
    expect(removed.get_by_role("cell", name="ada", exact=True)).to_be_visible()


def _solo_classes(stack: Stack, teacher: str, district_id: str) -> list[str]:
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute(
            "SELECT classes.id FROM classes JOIN class_teachers"
            " ON class_teachers.class_id = classes.id"
            " WHERE class_teachers.teacher_id = %s AND classes.district_id = %s"
            " AND NOT EXISTS (SELECT 1 FROM class_teachers other"
            " WHERE other.class_id = classes.id AND other.teacher_id <> %s)",
            (teacher, district_id, teacher),
        ).fetchall()
    return [str(r[0]) for r in rows]


def exit_status(stack: Stack, district_id: str) -> str:
    return str(stack.ops("GET", f"/ops/districts/{district_id}/exit").json()["status"])


def test_an_exit_is_started_seen_stalled_and_resumed(
    ada: Page, stack: Stack, district: District
) -> None:
    kim = district.copy(scenario.KIM)
    classes = _solo_classes(stack, kim, district.id)
    assert classes
    trigger = refuse_updates(stack, "classes", classes, "P0001")

    ada.goto(f"{stack.base}/console/districts/{district.id}")
    ada.get_by_role("button", name="Start exit").click()
    expect(ada.get_by_role("heading", name=re.compile("Start exit"))).to_be_visible()
    expect(ada.get_by_role("listitem").filter(has_text="student")).to_have_text("3 students")
    ada.get_by_role("button", name="Confirm").click()
    expect(ada.get_by_role("status")).to_have_text("Exit started.")

    def stalled() -> bool:
        return bool(
            stack.ops("GET", f"/ops/districts/{district.id}/exit").json()["status"] == "stalled"
        )

    wait_until(stalled, timeout=60, what="the exit to stall")
    ada.reload()
    expect(ada.get_by_role("row", name="Status stalled")).to_be_visible()
    expect(ada.get_by_role("row", name="Dead units")).to_contain_text(f"teacher:{kim}")
    allow_updates(stack, "classes", trigger)
    ada.get_by_role("button", name="Resume").click()
    expect(ada.get_by_role("status")).to_contain_text("Resumed: 1 units")

    def done() -> bool:
        return bool(
            stack.ops("GET", f"/ops/districts/{district.id}/exit").json()["status"] == "done"
        )

    wait_until(done, timeout=60, what="the exit to finish")
    ada.reload()
    expect(ada.get_by_role("row", name="Status done")).to_be_visible()


def test_an_account_converted_by_mistake_is_restored(
    ada: Page, stack: Stack, district: District
) -> None:
    steve = district.copy(scenario.STEVE)
    district.settles(district.leaves(scenario.STEVE), "done")

    ada.get_by_label("Account id").fill(steve)
    ada.get_by_role("button", name="Find account").click()
    expect(ada.get_by_role("heading", name=f"Account {steve}")).to_be_visible()
    expect(ada.get_by_role("row", name="Kind grassroots")).to_be_visible()
    ada.get_by_role("button", name="Restore").click()

    expect(ada.get_by_role("status")).to_contain_text("Restored")
    expect(ada.get_by_role("row", name="Kind district")).to_be_visible()
    assert stack.account(steve)["kind"] == "district"


def test_a_viewer_sees_no_change_button_and_a_forged_post_is_403(
    page: Page, stack: Stack, tokens: dict[str, str], district: District
) -> None:
    sign_in(page, stack, "vic", tokens["vic"])
    steve = district.copy(scenario.STEVE)
    for path in [
        "/console/",
        "/console/events",
        "/console/dead",
        "/console/held",
        "/console/pauses",
        f"/console/districts/{district.id}",
        f"/console/accounts/{steve}",
        "/console/audit",
    ]:
        page.goto(f"{stack.base}{path}")
        expect(page.get_by_role("heading", level=1)).to_have_count(1)
        for name in CHANGE_BUTTONS:
            expect(page.get_by_role("button", name=name, exact=True)).to_have_count(0)

    csrf = page.locator('input[name="csrf"]').first.get_attribute("value")
    forged = page.request.post(
        f"{stack.base}/console/districts/{district.id}/exit", form={"csrf": csrf or ""}
    )

    assert forged.status == 403
    assert stack.ops("GET", f"/ops/districts/{district.id}/exit").status_code == 404
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto(f"{stack.base}/console/audit")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
