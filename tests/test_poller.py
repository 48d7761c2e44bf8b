"""The Clever Events API poller, SPEC §5.3, against a local Clever-shaped server: reading the
feed, its limits and its failures.

Every test reads back what the inbox and the cursor table hold after real passes over HTTP (the
harness is ``tests/support/poller.py``). Concurrency, the district mirror and the run end to end
are in ``test_poller_pipeline.py``; the crashes, the command and the task in
``test_poller_processes.py``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import httpx
import pytest

from tasks.inbox import previous_attributes
from tests.support.fake_clever import FakeClever, Scripted
from tests.support.poller import FAST, Db, Ids, Poller, after
from worker.clever import DistrictToken, RateLimiter, parse_tokens
from worker.poller import poll_all, reset_district
from worker.settings import ConfigError

# --------------------------------------------------------------------------------------------
# Reading the feed


def test_first_pass_starts_after_the_newest_event_without_ingesting_history(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    d = ids.district()
    clever.add(d, ids.event(1), ids.event(2), ids.event(3))

    first = poll()

    assert (first.outcome, first.cursor, first.new) == ("started", ids.eid(3), 0)
    assert clever.requests(d)[0].query == {"ending_before": "last", "limit": "1"}
    assert db.inbox(d) == [] and poll.sent == []
    clever.add(d, ids.event(4), ids.event(5))
    second = poll()
    assert (second.outcome, second.new, second.cursor) == ("polled", 2, ids.eid(5))
    assert db.inbox(d) == poll.sent == ids.eids(range(4, 6))
    assert db.cursor(d).cursor == ids.eid(5)


def test_first_pass_on_an_empty_feed_reads_later_events_from_the_start(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    assert poll().outcome == "started"
    clever.add(ids.district(), ids.event(1))

    assert poll().new == 1
    assert db.inbox(ids.district()) == [ids.eid(1)]


@pytest.mark.parametrize("wrap", [True, False], ids=["wrapped", "bare"])
def test_pages_are_followed_along_next_links_until_an_empty_page(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids, wrap: bool
) -> None:
    d = ids.district()
    clever.wrap = wrap
    poll()
    clever.add(d, *(ids.event(n) for n in range(1, 6)))

    result = poll()

    assert (result.pages, result.events, result.new) == (3, 5, 5)
    assert after(clever, d)[1:] == [None, ids.eid(2), ids.eid(4), ids.eid(5)]
    assert clever.requests(d)[-1].status == 200  # the empty page ended the pass
    assert db.inbox(d) == poll.sent == ids.eids(range(1, 6))
    assert db.payload(ids.eid(3)) == ids.event(3)  # stored as Clever sent it, unwrapped


def test_previous_attributes_beside_the_nested_event_are_kept(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    poll()
    prev: dict[str, Any] = {"roles": {"student": {}, "teacher": {}}}
    clever.add_items(
        ids.district(),
        {"data": ids.event(1), "previous_attributes": prev, "uri": "/v3.0/events/1"},
        {"data": {**ids.event(2), "previous_attributes": prev}, "uri": "/v3.0/events/2"},
    )

    poll()

    assert previous_attributes(db.payload(ids.eid(1))) == prev
    assert previous_attributes(db.payload(ids.eid(2))) == prev


def test_from_start_replays_the_window_and_stores_each_event_once(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    clever.add(ids.district(), *(ids.event(n) for n in range(1, 6)))
    poll()  # starts at the newest: history is not read by accident

    replay = poll(from_start=True)
    again = poll(from_start=True)

    assert (replay.pages, replay.new, replay.cursor) == (3, 5, ids.eid(5))
    assert (again.pages, again.new) == (3, 0)
    assert db.inbox(ids.district()) == poll.sent == ids.eids(range(1, 6))


def test_a_replay_that_fails_half_way_resumes_from_its_cursor_not_from_the_newest_event(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    d = ids.district()
    clever.add(d, *(ids.event(n) for n in range(1, 6)))
    clever.script(d, *(Scripted(502, after=ids.eid(2)) for _ in range(FAST.attempts)))

    assert (poll(from_start=True).outcome, db.cursor(d).cursor) == ("failed", ids.eid(2))
    resumed = poll()

    assert (resumed.outcome, resumed.new) == ("polled", 3)
    assert db.inbox(d) == poll.sent == ids.eids(range(1, 6))


def test_a_next_link_to_another_host_is_not_followed(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    poll()
    page = {"data": [ids.event(1)], "links": [{"rel": "next", "uri": "http://elsewhere.test/x"}]}
    clever.script(ids.district(), Scripted(body=page))

    result = poll()

    assert result.outcome == "failed" and "away from CLEVER_API_BASE" in str(result.error)
    assert db.inbox(ids.district()) == [ids.eid(1)]  # the page itself was fine and is kept


# --------------------------------------------------------------------------------------------
# Limits and failures


def test_a_rate_limited_request_waits_until_the_reset_time_then_retries(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    d = ids.district()
    poll()
    clever.add(d, ids.event(1))
    clever.script(d, Scripted(429, reset_in=0.5))

    result = poll()

    limited, retried = clever.requests(d)[1:3]
    assert limited.status == 429 and limited.reset is not None
    assert retried.at >= limited.reset
    assert result.outcome == "polled" and db.inbox(d) == [ids.eid(1)]


def test_server_errors_and_timeouts_are_retried_and_lose_nothing(
    db: Db, ids: Ids, clever: FakeClever
) -> None:
    d = ids.district()
    poll = Poller(db, ids, replace(FAST, base_url=clever.url, timeout=httpx.Timeout(0.5)))
    poll()
    clever.add(d, ids.event(1), ids.event(2), ids.event(3))
    clever.script(d, Scripted(500), Scripted(503), Scripted(delay=2.0, after=ids.eid(2)))

    result = poll()

    assert [r.status for r in clever.requests(d)[1:3]] == [500, 503]
    assert after(clever, d).count(ids.eid(2)) == 2  # the page that timed out was asked again
    assert result.outcome == "polled" and db.inbox(d) == ids.eids(range(1, 4))


def test_a_pass_that_keeps_failing_resumes_from_its_committed_cursor(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    d = ids.district()
    poll()
    clever.add(d, *(ids.event(n) for n in range(1, 6)))
    clever.script(d, *(Scripted(502, after=ids.eid(2)) for _ in range(FAST.attempts)))

    failed = poll()
    assert (failed.outcome, failed.cursor, failed.error) == (
        "failed",
        ids.eid(2),
        "Clever answered 502",
    )
    assert db.inbox(d) == ids.eids(range(1, 3))
    assert db.cursor(d).last_error == "Clever answered 502"

    resumed = poll()
    assert after(clever, d)[-4] == ids.eid(2)
    assert (resumed.outcome, resumed.new) == ("polled", 3)
    assert poll.sent == ids.eids(range(1, 6))


def test_a_page_with_a_number_json_cannot_hold_fails_the_pass_and_stores_nothing_of_it(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    # Python's parser would read NaN; the inbox's JSON column could not store it.
    d = ids.district()
    poll()
    odd = {"data": [{**ids.event(1), "created": float("nan")}], "links": []}
    clever.script(d, *(Scripted(body=odd) for _ in range(FAST.attempts)))

    failed = poll()

    assert failed.outcome == "failed"
    assert "not JSON" in str(failed.error) and "NaN" in str(failed.error)
    assert db.inbox(d) == []


def test_a_token_refused_three_passes_in_a_row_disconnects_the_district_without_logging_it(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids, caplog: pytest.LogCaptureFixture
) -> None:
    d, stale = ids.district(), f"tok-revoked-{ids.tag}-5c2e81f0"
    caplog.set_level(logging.DEBUG)

    outcomes = [poll(token=stale).outcome for _ in range(4)]

    assert outcomes == ["unauthorized", "unauthorized", "disconnected", "skipped"]
    assert len(clever.requests(None)) == 3  # the skipped pass asked nothing
    row = db.cursor(d)
    assert (row.status, row.unauthorized_passes) == ("disconnected", 3)
    assert any(
        r.levelno == logging.ERROR and f"district {d} disconnected" in r.getMessage()
        for r in caplog.records
    )
    assert stale not in caplog.text and stale not in str(row.__dict__)

    assert poll().outcome == "started"  # a new token lifts the disconnection
    assert (db.cursor(d).status, db.cursor(d).unauthorized_passes) == ("ok", 0)


def test_an_operator_reset_polls_a_disconnected_district_again(
    poll: Poller, db: Db, ids: Ids
) -> None:
    for _ in range(3):
        poll(token="tok-revoked")
    assert poll(token="tok-revoked").outcome == "skipped"

    assert reset_district(db.session, ids.district())

    assert poll(token="tok-revoked").outcome == "unauthorized"
    assert db.cursor(ids.district()).status == "ok"


def test_a_cursor_clever_no_longer_knows_marks_the_district_for_resync(
    poll: Poller, clever: FakeClever, db: Db, ids: Ids
) -> None:
    d = ids.district()
    clever.add(d, ids.event(1))
    poll()
    clever.add(d, ids.event(2), ids.event(3))
    clever.expire(d, 2)  # the cursor fell out of the 30-day window

    lost = poll()
    skipped = poll()

    assert (lost.outcome, lost.cursor) == ("resync_needed", ids.eid(1))
    assert db.cursor(d).status == "resync_needed"
    assert skipped.outcome == "skipped" and len(clever.requests(d)) == 2
    assert db.inbox(d) == []

    reset_district(db.session, d)  # after a full resync from the roster
    restarted = poll()
    assert (restarted.outcome, restarted.cursor) == ("started", ids.eid(3))
    clever.add(d, ids.event(4))
    assert poll().new == 1 and db.inbox(d) == [ids.eid(4)]


def test_one_district_failing_never_stops_the_others(db: Db, ids: Ids, clever: FakeClever) -> None:
    for k in (1, 2):
        clever.district(ids.district(k), ids.token(k))
    tokens = parse_tokens(
        [f"{ids.district(0)}:tok-revoked"] + [f"{ids.district(k)}:{ids.token(k)}" for k in (1, 2)]
    )
    options = replace(FAST, base_url=clever.url)
    sent: list[str] = []
    poll_all(db.session, tokens, options=options, enqueue=sent.extend)
    clever.add(ids.district(1), ids.event(1, k=1))
    clever.add(ids.district(2), ids.event(2, k=2))
    clever.script(ids.district(1), *(Scripted(500) for _ in range(FAST.attempts)))

    results = poll_all(db.session, tokens, options=options, enqueue=sent.extend)

    assert [(r.district_id, r.outcome) for r in results] == [
        (ids.district(0), "unauthorized"),
        (ids.district(1), "failed"),
        (ids.district(2), "polled"),
    ]
    assert db.inbox(*(ids.district(k) for k in range(3))) == sent == [ids.eid(2)]


def test_the_client_side_limiter_allows_at_most_the_limit_in_any_window() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = RateLimiter(3, 60.0, clock=lambda: now[0], sleep=sleep)
    sent_at = []
    for _ in range(7):
        limiter.acquire()
        sent_at.append(now[0])
        now[0] += 1.0

    assert sent_at == [0.0, 1.0, 2.0, 60.0, 61.0, 62.0, 120.0]


def test_district_tokens_are_parsed_without_echoing_a_bad_entry() -> None:
    district, token = Ids("c0de").district(), Ids("c0de").token()
    assert parse_tokens([f" {district}:{token} "]) == [DistrictToken(district, token)]
    assert token not in repr(DistrictToken(district, token))
    with pytest.raises(ConfigError) as bad:
        parse_tokens([f"{district}:{token}", "tok-without-district"])
    assert "entry 2" in str(bad.value) and "tok-without-district" not in str(bad.value)
