"""The Clever-shaped server itself (tests/support/fake_clever.py): its Data API pages as Clever's
v3 API does, refuses as Clever does, and plays a scripted fault once. The poller's and the roster
sync's tests rely on exactly this; here it is pinned with a plain HTTP client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from tests.support import scenario
from tests.support.fake_clever import (
    EVENTS,
    SECTIONS,
    USERS,
    FakeClever,
    Scripted,
    district_path,
    next_repeats,
    next_to,
    without_data,
)
from worker.clever import CleverClient, ClientOptions, DistrictToken, RateLimiter, ServerError

D = scenario.DISTRICT
TOKEN = "tok-fake-clever-3e1f"


@pytest.fixture
def fake() -> Iterator[FakeClever]:
    with FakeClever() as server:
        server.roster(D, TOKEN, scenario.example())
        yield server


@pytest.fixture
def http(fake: FakeClever) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, headers={"authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def links(body: dict[str, Any]) -> dict[str, str]:
    return {link["rel"]: link["uri"] for link in body["links"]}


def query(uri: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(uri).query))


def test_lists_page_in_id_order_along_next_links_to_an_empty_page(
    fake: FakeClever, http: httpx.Client
) -> None:
    everyone = sorted(scenario.ids(scenario.example()["users"]))
    pages: list[list[str]] = []
    uri = f"{USERS}?limit=4"
    while True:
        body = http.get(uri).raise_for_status().json()
        pages.append([item["data"]["id"] for item in body["data"]])
        assert all(item["uri"] == f"{USERS}/{item['data']['id']}" for item in body["data"])
        if not body["data"]:
            assert set(links(body)) == {"self"}  # the empty last page has no next link
            break
        uri = links(body)["next"]
        assert uri.startswith(f"{USERS}?") and query(uri) == {
            "limit": "4",
            "starting_after": pages[-1][-1],
        }

    assert len(everyone) > 4 and pages == [
        everyone[n : n + 4] for n in range(0, len(everyone), 4)
    ] + [[]]
    assert [r.query for r in fake.requests(D, USERS)] == [{"limit": "4"}] + [
        {"limit": "4", "starting_after": page[-1]} for page in pages[:-1]
    ]
    students = http.get(USERS, params={"role": "student"}).json()["data"]
    assert [i["data"]["id"] for i in students] == sorted(
        u["id"] for u in scenario.example()["users"] if "student" in u["roles"]
    )
    last = http.get(SECTIONS, params={"ending_before": scenario.S3, "limit": 1}).json()
    assert [i["data"]["id"] for i in last["data"]] == [scenario.S2]


def test_the_district_record_is_clevers_without_our_policy(http: httpx.Client) -> None:
    body = http.get(district_path(D)).raise_for_status().json()

    assert body["data"]["id"] == D and "policy" not in body["data"]
    assert http.get(district_path("5b2a6f0c8e9d7a00ffffffff")).status_code == 404


def test_refusals_unknown_token_unknown_cursor_limit_over_the_cap(
    fake: FakeClever, http: httpx.Client
) -> None:
    assert http.get(USERS, headers={"authorization": "Bearer nope"}).status_code == 401
    assert http.get(USERS, params={"starting_after": "f" * 24}).status_code == 404
    assert http.get(USERS, params={"limit": 10_001}).status_code == 413  # Clever's answer
    assert http.get(USERS, params={"limit": 10_000}).status_code == 200
    fake.data_max_page = 4
    assert http.get(USERS, params={"limit": 5}).status_code == 413
    assert len(http.get(USERS).json()["data"]) == 4  # unasked: the default, within the cap
    assert len(fake.requests(None)) == 1  # the unknown token, recorded without a district


def test_mutations_are_served_as_clever_would_serve_them(
    fake: FakeClever, http: httpx.Client
) -> None:
    assert fake.remove_users(D, scenario.STEVE) == 1
    fake.drop_role(D, scenario.RIVERA, "district_admin")
    fake.shrink_section(D, scenario.S3, students=[scenario.LEO])
    fake.remove_sections(D, scenario.S1)

    users = {i["data"]["id"]: i["data"] for i in http.get(USERS).json()["data"]}
    sections = {i["data"]["id"]: i["data"] for i in http.get(SECTIONS).json()["data"]}
    assert scenario.STEVE not in users and set(users[scenario.RIVERA]["roles"]) == {"teacher"}
    assert sections.keys() == {scenario.S2, scenario.S3}
    assert sections[scenario.S2]["students"] == []  # Steve left his sections with the roster
    assert sections[scenario.S3]["students"] == [scenario.MARIA]


def test_a_scripted_fault_is_served_once_to_its_path_only(
    fake: FakeClever, http: httpx.Client
) -> None:
    fake.script(D, Scripted(503, path=USERS), Scripted(edit=without_data, path=SECTIONS))

    assert http.get(EVENTS).status_code == 200  # another path: not its fault
    assert http.get(USERS).status_code == 503
    assert http.get(USERS).status_code == 200  # once
    assert "data" not in http.get(SECTIONS).json()
    assert [r.status for r in fake.requests(D)] == [200, 503, 200, 200]


def test_the_projects_client_reads_the_pages_and_sees_the_faults(fake: FakeClever) -> None:
    options = ClientOptions(base_url=fake.url, attempts=2, backoff=0.01, backoff_max=0.01)
    token = DistrictToken(D, TOKEN)
    fake.script(D, Scripted(edit=next_repeats, path=USERS))
    with CleverClient(token, options, limiter=RateLimiter()) as api:
        first = api.page(f"{USERS}?limit=4")
        assert first.next_uri == f"{USERS}?limit=4"  # the same page again: never forward
        fake.script(D, Scripted(edit=next_to("http://elsewhere.test/v3.0/users"), path=USERS))
        assert api.page(f"{USERS}?limit=4").next_uri == "http://elsewhere.test/v3.0/users"
        fake.script(D, *(Scripted(raw=b"<html>busy</html>", path=SECTIONS) for _ in range(2)))
        with pytest.raises(ServerError, match="not JSON"):
            api.page(SECTIONS)
