"""The Clever Events API poller (SPEC §5.3).

Clever pushes nothing: each district's changes are a pull feed, 30 days deep, read with that
district's own token (``worker.clever``). A pass reads each district's feed from its cursor, page
by page along the ``rel=next`` links until an empty page, and puts every event into the same inbox
as the webhooks (same dedupe by event id, same ordering fence and routing downstream). A page's
inbox rows and the cursor that moves past them commit in one transaction, and the new events are
sent to the workers only after that commit: a crash at any point loses nothing and applies
nothing twice.

The cursor row keeps a SHA-256 of the token, never the token, to notice when an operator
replaces it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode

import httpx
from sqlalchemy.orm import Session

from models import EventStatus, PollStatus, utcnow
from tasks import cursors
from tasks.inbox import BadEvent, ingest
from worker.clever import (
    CleverClient,
    CleverError,
    CleverNotFound,
    CleverUnauthorized,
    ClientOptions,
    DistrictToken,
    ServerError,
    describe_error,
)
from worker.dispatch import enqueue_events

log = logging.getLogger("grassroots.poller")

SessionFactory = Callable[[], AbstractContextManager[Session]]
Enqueue = Callable[[Sequence[str]], object]

EVENTS_PAGE_SIZE = 1000


@dataclass(frozen=True)
class PollOptions(ClientOptions):
    page_size: int = EVENTS_PAGE_SIZE
    # Consecutive passes answered 401 before a district is disconnected.
    disconnect_after: int = 3


# --------------------------------------------------------------------------------------------
# The events feed


EVENTS_PATH = "/v3.0/events"


def unwrap(item: Any) -> Any:
    """The event of one list item: Clever nests each event in its own ``data`` (``{"data":
    event, "uri": …}``); a bare event is taken as it is. ``previous_attributes`` found beside
    the nested event (in the wrapper) is kept beside it, where the inbox reads it too."""
    if not isinstance(item, dict) or "type" in item:
        return item
    event = item.get("data")
    if not isinstance(event, dict):
        return item
    prev = item.get("previous_attributes")
    if isinstance(prev, dict) and "previous_attributes" not in event:
        data = event.get("data")
        if not (isinstance(data, dict) and "previous_attributes" in data):
            event = {**event, "previous_attributes": prev}
    return event


def event_id(item: Any) -> str | None:
    event = unwrap(item)
    value = event.get("id") if isinstance(event, dict) else None
    return value if isinstance(value, str) and value else None


def first_uri(cursor: str | None, page_size: int) -> str:
    """The feed's first page after ``cursor`` (None: from the start of the 30-day window)."""
    params: dict[str, str | int] = {"starting_after": cursor} if cursor else {}
    return f"{EVENTS_PATH}?{urlencode({**params, 'limit': page_size})}"


def newest(api: CleverClient) -> str | None:
    """The id of the newest event in the feed (None if the feed is empty)."""
    page = api.page(f"{EVENTS_PATH}?ending_before=last&limit=1")
    ids = [i for i in map(event_id, page.items) if i is not None]
    return ids[-1] if ids else None


# --------------------------------------------------------------------------------------------
# One district


class PollOutcome(StrEnum):
    POLLED = "polled"  # read to the end of the feed
    STARTED = "started"  # first pass: the cursor is set at the newest event
    RACED = "raced"  # another poller moved the cursor: the feed is left to it
    SKIPPED = "skipped"  # disconnected, or waiting for a resync
    # See the result's ``error``:
    UNAUTHORIZED = "unauthorized"
    DISCONNECTED = "disconnected"
    RESYNC_NEEDED = "resync_needed"
    FAILED = "failed"


@dataclass
class PollResult:
    district_id: str
    outcome: PollOutcome
    pages: int = 0
    events: int = 0
    new: int = 0
    cursor: str | None = None
    error: str | None = None

    @property
    def needs_resync(self) -> bool:
        """Events were missed: found now, or found before and still waiting for a sync."""
        return self.outcome == PollOutcome.RESYNC_NEEDED or (
            self.outcome == PollOutcome.SKIPPED and self.error == PollStatus.RESYNC_NEEDED
        )

    @property
    def ok(self) -> bool:
        return self.outcome in (PollOutcome.POLLED, PollOutcome.STARTED, PollOutcome.RACED)

    def as_dict(self) -> dict[str, Any]:
        return {
            "district": self.district_id,
            "outcome": self.outcome,
            "pages": self.pages,
            "events": self.events,
            "new": self.new,
            "cursor": self.cursor,
            "error": self.error,
        }


class CursorMoved(Exception):
    """Another poller committed past the cursor this one started from."""


def _begin_pass(
    session_factory: SessionFactory, token: DistrictToken, *, from_start: bool
) -> cursors.CursorStart:
    with session_factory() as session:
        start = cursors.begin_pass(
            session, token.district_id, token.fingerprint, from_start=from_start
        )
    if start.reconnected:
        log.warning("district %s has a new token: polling it again", token.district_id)
    return start


def _commit_page(
    session_factory: SessionFactory,
    district_id: str,
    items: list[Any],
    *,
    expected: str | None,
    cursor: str,
) -> tuple[list[str], int, int]:
    """Store one page and move the cursor past it, in one transaction. Returns the ids to send
    to the workers, how many events were new, and how many could not be stored at all."""
    fresh: list[str] = []
    new = bad = 0
    with session_factory() as session:
        for position, item in enumerate(items):
            try:
                stored = ingest(session, unwrap(item), source="poll")
            except BadEvent as exc:
                # Not an event at all: nothing to store. Skipped, or it would block the feed.
                bad += 1
                log.error(
                    "district %s: item %d after %s skipped: %s",
                    district_id,
                    position,
                    expected,
                    exc,
                )
                continue
            if stored.new:
                new += 1
                if stored.status == EventStatus.ACCEPTED:
                    fresh.append(stored.event_id)
        if not cursors.move_past_page(
            session, district_id, expected=expected, cursor=cursor, new=new
        ):
            raise CursorMoved(district_id)
    return fresh, new, bad


def poll_district(
    session_factory: SessionFactory,
    token: DistrictToken,
    *,
    options: PollOptions | None = None,
    from_start: bool = False,
    enqueue: Enqueue = enqueue_events,
) -> PollResult:
    """One pass over one district's feed. Errors from Clever end up in the result (and on the
    cursor row); a database error propagates."""
    options = options or PollOptions()
    district_id = token.district_id
    start = _begin_pass(session_factory, token, from_start=from_start)
    if start.status != PollStatus.OK and not from_start:
        return PollResult(district_id, PollOutcome.SKIPPED, cursor=start.cursor, error=start.status)
    result = PollResult(district_id, PollOutcome.POLLED, cursor=start.cursor)
    if start.started and _beyond_the_window(start.last_success_at):
        # Clever keeps 30 days of events: what happened since may be gone from the feed.
        return _resync_needed(
            session_factory, result, "the cursor is older than Clever's 30-day event window"
        )
    with CleverClient(token, options) as api:
        try:
            if not start.started:
                return _start_at_newest(session_factory, api, result)
            _read_feed(
                session_factory,
                api,
                result,
                page_size=options.page_size,
                from_start=from_start,
                send=enqueue,
            )
        except CleverUnauthorized as exc:
            return _token_refused(session_factory, options, result, exc)
        except CleverNotFound as exc:
            if result.cursor is None:
                return _pass_failed(session_factory, result, exc)
            return _resync_needed(session_factory, result, "cursor unknown to Clever (404)")
        except CursorMoved:
            log.info(
                "district %s: another poller moved the cursor; leaving the feed to it", district_id
            )
            result.outcome = PollOutcome.RACED
            return result
        except (CleverError, httpx.HTTPError) as exc:
            return _pass_failed(session_factory, result, exc)
    with session_factory() as session:
        cursors.succeeded(session, district_id)
    log.info(
        "district %s: %d page(s), %d event(s), %d new; cursor %s",
        district_id,
        result.pages,
        result.events,
        result.new,
        result.cursor,
    )
    return result


def _start_at_newest(
    session_factory: SessionFactory, api: CleverClient, result: PollResult
) -> PollResult:
    """A district's first pass records where its feed ends, without reading 30 days of history
    (``--from-start`` replays it on purpose)."""
    last = newest(api)
    with session_factory() as session:
        cursors.start_at(session, result.district_id, last, first=True)
    result.outcome, result.cursor = PollOutcome.STARTED, last
    log.info(
        "district %s: first pass, starting after the newest event %s",
        result.district_id,
        last or "(the feed is empty)",
    )
    return result


def _read_feed(
    session_factory: SessionFactory,
    api: CleverClient,
    result: PollResult,
    *,
    page_size: int,
    from_start: bool,
    send: Enqueue,
) -> None:
    """To the end of the feed, each page committed with the cursor past it."""
    expected = result.cursor  # what the cursor row holds: it moves only from there
    after = None if from_start else expected  # what the page asked for starts after
    uri: str | None = first_uri(after, page_size)
    while uri is not None:
        page = api.page(uri)
        if not page.items:
            return
        last = next((i for i in map(event_id, reversed(page.items)) if i is not None), None)
        if last is None or last == after:
            raise ServerError("a page that does not move the feed forward")
        fresh, new, bad = _commit_page(
            session_factory, result.district_id, page.items, expected=expected, cursor=last
        )
        # After the commit, never before: a worker must find the row. A broker outage is
        # logged by ``send``; the relay sends these later.
        if fresh:
            send(fresh)
        result.pages += 1
        result.events += len(page.items) - bad
        result.new += new
        result.cursor = expected = after = last
        uri = page.next_uri


def _token_refused(
    session_factory: SessionFactory, options: PollOptions, result: PollResult, exc: Exception
) -> PollResult:
    with session_factory() as session:
        passes = cursors.refused(
            session, result.district_id, str(exc), disconnect_after=options.disconnect_after
        )
    result.error = str(exc)
    if passes >= options.disconnect_after:
        result.outcome = PollOutcome.DISCONNECTED
        log.error(
            "district %s disconnected: Clever refused its token %d passes in a row; it is"
            " skipped until its token changes or an operator resets it",
            result.district_id,
            passes,
        )
    else:
        result.outcome = PollOutcome.UNAUTHORIZED
        log.warning(
            "district %s: Clever refused its token (%d of %d passes before disconnecting)",
            result.district_id,
            passes,
            options.disconnect_after,
        )
    return result


# How long Clever keeps a district's events.
FEED_WINDOW = timedelta(days=30)


def _beyond_the_window(last_success_at: datetime | None) -> bool:
    return last_success_at is not None and last_success_at < utcnow() - FEED_WINDOW


def _resync_needed(session_factory: SessionFactory, result: PollResult, why: str) -> PollResult:
    """Events were missed (the cursor's event left Clever's window): the district needs a roster
    sync, which runs without an operator (``worker.sync.resync_if_due``) and tells the poller
    where to go on from."""
    log.error(
        "district %s: %s (cursor %s): the district needs a roster sync",
        result.district_id,
        why,
        result.cursor,
    )
    result.outcome, result.error = PollOutcome.RESYNC_NEEDED, why
    with session_factory() as session:
        cursors.failed(session, result.district_id, why, status=PollStatus.RESYNC_NEEDED)
    return result


def _pass_failed(
    session_factory: SessionFactory, result: PollResult, exc: BaseException
) -> PollResult:
    result.outcome, result.error = PollOutcome.FAILED, describe_error(exc)
    log.warning(
        "district %s: pass ended after %d page(s): %s; cursor stays at %s",
        result.district_id,
        result.pages,
        result.error,
        result.cursor,
    )
    with session_factory() as session:
        cursors.failed(session, result.district_id, result.error)
    return result


def reset_district(session_factory: SessionFactory, district_id: str) -> bool:
    """An operator's reset: a disconnected or resync-needed district is polled again, from the
    newest event on (resync its roster first). False if the district was never polled."""
    with session_factory() as session:
        reset = cursors.reset(session, district_id)
    if reset:
        log.warning("district %s reset by an operator: restarting at the newest event", district_id)
    return reset


# --------------------------------------------------------------------------------------------
# Every district


def poll_all(
    session_factory: SessionFactory,
    tokens: Sequence[DistrictToken],
    *,
    options: PollOptions | None = None,
    from_start: bool = False,
    enqueue: Enqueue = enqueue_events,
) -> list[PollResult]:
    """One pass over every district, one after the other. One district's failure, whatever it
    is, never stops the others."""
    results = []
    for token in tokens:
        try:
            result = poll_district(
                session_factory,
                token,
                options=options,
                from_start=from_start,
                enqueue=enqueue,
            )
        except Exception as exc:
            # The class name only: a database error's text can quote an event's personal data.
            log.error("district %s: pass failed: %s", token.district_id, type(exc).__name__)
            result = PollResult(token.district_id, PollOutcome.FAILED, error=type(exc).__name__)
        results.append(result)
    return results
