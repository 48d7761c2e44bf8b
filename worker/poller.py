"""The Clever Events API poller (SPEC §5.3).

Clever pushes nothing: each district's changes are a pull feed, 30 days deep, read with that
district's own token. A pass reads each district's feed from its cursor, page by page along the
``rel=next`` links until an empty page, and puts every event into the same inbox as the webhooks
(same dedupe by event id, same ordering fence and routing downstream). A page's inbox rows and
the cursor that moves past them commit in one transaction, and the new events are sent to the
workers only after that commit: a crash at any point loses nothing and applies nothing twice.

Tokens come from ``CLEVER_DISTRICT_TOKENS`` only and never reach a log line or the database
(the cursor row keeps a SHA-256 of the token, to notice when an operator replaces it).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from models import PollCursor, utcnow
from tasks.inbox import BadEvent, NotJson, ingest, parse_json
from tasks.sql import dialect_insert
from worker.settings import ConfigError, Settings

log = logging.getLogger("grassroots.poller")

SessionFactory = Callable[[], AbstractContextManager[Session]]
Enqueue = Callable[[Sequence[str]], object]

EVENTS_PATH = "/v3.0/events"
PAGE_SIZE = 1000
# Clever's published limit for a district token.
RATE_LIMIT = 1200
RATE_PERIOD = 60.0


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DistrictToken:
    district_id: str
    token: str = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.token.encode()).hexdigest()


def parse_tokens(entries: Iterable[str]) -> list[DistrictToken]:
    """``district_id:token`` entries, as in ``CLEVER_DISTRICT_TOKENS``. A bad entry is named by
    its position only: its text may hold a token."""
    tokens: dict[str, DistrictToken] = {}
    for n, entry in enumerate(entries, start=1):
        district_id, sep, token = entry.strip().partition(":")
        district_id, token = district_id.strip(), token.strip()
        if not sep or not district_id or not token or len(district_id) > 64:
            raise ConfigError(f"CLEVER_DISTRICT_TOKENS entry {n} is not 'district_id:token'")
        if district_id in tokens:
            raise ConfigError(f"CLEVER_DISTRICT_TOKENS names district {district_id} twice")
        tokens[district_id] = DistrictToken(district_id, token)
    return list(tokens.values())


@dataclass(frozen=True)
class PollOptions:
    base_url: str = "https://api.clever.com"
    page_size: int = PAGE_SIZE
    # Explicit timeouts: a Clever that stops answering must not hang a pass (or a worker) forever.
    timeout: httpx.Timeout = field(
        default_factory=lambda: httpx.Timeout(connect=5.0, read=30.0, write=10.0, pool=5.0)
    )
    # Tries per request: 5xx, timeouts and 429s share this budget.
    attempts: int = 6
    backoff: float = 0.5
    backoff_max: float = 30.0
    # A 429 whose reset is further away than this ends the district's pass; the next pass resumes.
    max_rate_limit_wait: float = 300.0
    # Consecutive passes answered 401 before a district is disconnected.
    disconnect_after: int = 3

    @classmethod
    def from_settings(cls, settings: Settings) -> PollOptions:
        return cls(base_url=settings.clever_api_base)


# --------------------------------------------------------------------------------------------
# Client-side rate limit


class RateLimiter:
    """At most ``limit`` requests in any ``period`` seconds (a sliding window, so a burst at the
    end of one minute and another at the start of the next cannot add up to twice the limit).

    Per process: passes in other processes that share a token are kept in line by Clever's 429s.
    """

    def __init__(
        self,
        limit: int = RATE_LIMIT,
        period: float = RATE_PERIOD,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.limit, self.period = limit, period
        self._clock, self._sleep = clock, sleep
        self._sent: deque[float] = deque()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                while self._sent and self._sent[0] <= now - self.period:
                    self._sent.popleft()
                if len(self._sent) < self.limit:
                    self._sent.append(now)
                    return
                wait = self._sent[0] + self.period - now
            self._sleep(wait)


_limiters: dict[str, RateLimiter] = {}
_limiters_lock = threading.Lock()


def limiter_for(token: DistrictToken) -> RateLimiter:
    """The process-wide limiter of one token (Clever counts requests per token)."""
    with _limiters_lock:
        return _limiters.setdefault(token.fingerprint, RateLimiter())


# --------------------------------------------------------------------------------------------
# The HTTP side


class PollError(Exception):
    """Why a request to Clever failed; the message holds no token and no personal data."""


class Unauthorized(PollError):
    pass


class NotFound(PollError):
    pass


class RateLimited(PollError):
    def __init__(self, wait: float) -> None:
        super().__init__(f"rate limited for {wait:.1f} s")
        self.wait = wait


class ServerError(PollError):
    """Worth retrying: a 5xx, or a page that is not the JSON Clever promises."""


class ClientError(PollError):
    """Not worth retrying: an unexpected 4xx, or a link that leaves the API."""


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_uri: str | None


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


def _rate_limit_wait(response: httpx.Response) -> float:
    """Seconds until ``X-RateLimit-Reset`` (epoch seconds), else ``Retry-After``, else 1."""
    for header, to_wait in (
        ("x-ratelimit-reset", lambda v: float(v) - time.time()),
        ("retry-after", float),
    ):
        value = response.headers.get(header)
        if value is not None:
            try:
                return max(0.0, to_wait(value))
            except ValueError:
                continue
    return 1.0


# Worth another try: Clever or the network hiccuped. Anything else fails the district's pass.
RETRYABLE = (
    ServerError,
    RateLimited,
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


class CleverEvents:
    """Reads one district's event feed with its token: rate-limited, retried, bounded in time."""

    def __init__(
        self,
        token: DistrictToken,
        options: PollOptions,
        *,
        limiter: RateLimiter | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.district_id = token.district_id
        self.options = options
        self._base = options.base_url.rstrip("/")
        self._origin = httpx.URL(self._base).copy_with(path="/", query=None)
        self._limiter = limiter or limiter_for(token)
        self._sleep = sleep
        self._backoff = wait_random_exponential(multiplier=options.backoff, max=options.backoff_max)
        self._http = httpx.Client(
            headers={"authorization": f"Bearer {token.token}", "accept": "application/json"},
            timeout=options.timeout,
            # A redirect could carry the bearer token elsewhere; Clever's API does not redirect.
            follow_redirects=False,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CleverEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # requests -----------------------------------------------------------------------------

    def first_uri(self, cursor: str | None) -> str:
        params: dict[str, str | int] = {"starting_after": cursor} if cursor else {}
        return f"{EVENTS_PATH}?{urlencode({**params, 'limit': self.options.page_size})}"

    def newest(self) -> str | None:
        """The id of the newest event in the feed (None if the feed is empty)."""
        page = self.page(f"{EVENTS_PATH}?ending_before=last&limit=1")
        ids = [i for i in map(event_id, page.items) if i is not None]
        return ids[-1] if ids else None

    def page(self, uri: str) -> Page:
        url = self._url(uri)
        retrying = Retrying(
            retry=retry_if_exception_type(RETRYABLE),
            stop=self._stop,
            wait=self._wait,
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        for attempt in retrying:
            with attempt:
                return self._get(url)
        raise AssertionError("unreachable")  # pragma: no cover

    def _url(self, uri: str) -> httpx.URL:
        """Clever's links are paths on the API host; anything else would receive the token."""
        if uri.startswith("/"):
            return httpx.URL(self._base + uri)
        url = httpx.URL(uri)
        if url.copy_with(path="/", query=None) != self._origin:
            raise ClientError("a next link points away from CLEVER_API_BASE; not followed")
        return url

    def _get(self, url: httpx.URL) -> Page:
        self._limiter.acquire()
        response = self._http.get(url)
        status = response.status_code
        if status == 401:
            raise Unauthorized("Clever refused the district token (401)")
        if status == 404:
            raise NotFound("Clever answered 404")
        if status == 429:
            raise RateLimited(_rate_limit_wait(response))
        if status >= 500:
            raise ServerError(f"Clever answered {status}")
        if status != 200:
            raise ClientError(f"Clever answered {status}")
        try:
            body = parse_json(response.content)
        except NotJson as exc:
            raise ServerError(f"Clever answered a page that is not JSON: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise ServerError("Clever answered a page without a 'data' list")
        links = body.get("links")
        next_uri = next(
            (
                link["uri"]
                for link in (links if isinstance(links, list) else [])
                if isinstance(link, dict)
                and link.get("rel") == "next"
                and isinstance(link.get("uri"), str)
            ),
            None,
        )
        return Page(body["data"], next_uri)

    # retry policy -------------------------------------------------------------------------

    def _stop(self, state: RetryCallState) -> bool:
        if state.attempt_number >= self.options.attempts:
            return True
        exc = state.outcome.exception() if state.outcome else None
        return isinstance(exc, RateLimited) and exc.wait > self.options.max_rate_limit_wait

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RateLimited):
            return exc.wait  # until X-RateLimit-Reset: asking earlier only earns another 429
        return float(self._backoff(state))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "district %s: %s; retry %d in %.1f s",
            self.district_id,
            _describe(exc),
            state.attempt_number,
            wait,
        )


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, PollError):
        return str(exc)
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return type(exc).__name__


# --------------------------------------------------------------------------------------------
# One district


@dataclass
class PollResult:
    district_id: str
    # polled: read to the end of the feed. started: first pass, cursor set at the newest event.
    # skipped: disconnected or waiting for a resync. raced: another poller moved the cursor.
    # unauthorized / disconnected / resync_needed / failed: see ``error``.
    outcome: str
    pages: int = 0
    events: int = 0
    new: int = 0
    cursor: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in ("polled", "started", "raced")

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


@dataclass(frozen=True)
class _Start:
    cursor: str | None
    started: bool
    status: str


def _begin(session_factory: SessionFactory, token: DistrictToken, *, from_start: bool) -> _Start:
    """The district's cursor row (made on its first pass), noticing a new token."""
    now = utcnow()
    with session_factory() as session:
        session.execute(
            dialect_insert(session, PollCursor)
            .values(
                district_id=token.district_id,
                status="ok",
                unauthorized_passes=0,
                events_ingested=0,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing()
        )
        row = session.scalar(
            select(PollCursor).where(PollCursor.district_id == token.district_id).with_for_update()
        )
        assert row is not None
        if row.token_sha256 != token.fingerprint:
            if row.token_sha256 is not None and row.status == "disconnected":
                log.warning("district %s has a new token: polling it again", token.district_id)
                row.status, row.unauthorized_passes = "ok", 0
            row.token_sha256 = token.fingerprint
        if from_start and row.started_at is None:
            # A replay that fails half-way resumes from its cursor, not from the newest event.
            row.started_at = now
        row.last_polled_at = row.updated_at = now
        return _Start(row.cursor, row.started_at is not None, row.status)


def _finish(session_factory: SessionFactory, district_id: str, **values: Any) -> None:
    with session_factory() as session:
        session.execute(
            update(PollCursor)
            .where(PollCursor.district_id == district_id)
            .values(updated_at=utcnow(), **values)
        )


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
    now = utcnow()
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
                if stored.status == "accepted":
                    fresh.append(stored.event_id)
        moved = session.scalar(
            update(PollCursor)
            .where(
                PollCursor.district_id == district_id,
                PollCursor.cursor.is_not_distinct_from(expected),
            )
            .values(
                cursor=cursor,
                events_ingested=PollCursor.events_ingested + new,
                last_success_at=now,
                updated_at=now,
            )
            .returning(PollCursor.district_id)
        )
        if moved is None:
            raise CursorMoved(district_id)
    return fresh, new, bad


def _default_enqueue(event_ids: Sequence[str]) -> object:
    from tasks.jobs import enqueue_events

    return enqueue_events(event_ids)


def poll_district(
    session_factory: SessionFactory,
    token: DistrictToken,
    *,
    options: PollOptions | None = None,
    from_start: bool = False,
    enqueue: Enqueue | None = None,
) -> PollResult:
    """One pass over one district's feed. Errors from Clever end up in the result (and on the
    cursor row); a database error propagates."""
    options = options or PollOptions()
    send = enqueue or _default_enqueue
    district_id = token.district_id
    start = _begin(session_factory, token, from_start=from_start)
    if start.status != "ok" and not from_start:
        return PollResult(district_id, "skipped", cursor=start.cursor, error=start.status)
    result = PollResult(district_id, "polled", cursor=start.cursor)
    with CleverEvents(token, options) as api:
        try:
            if not start.started:
                return _start_at_newest(session_factory, api, result)
            _read_feed(session_factory, api, result, from_start=from_start, send=send)
        except Unauthorized as exc:
            return _unauthorized(session_factory, options, result, exc)
        except NotFound as exc:
            if result.cursor is None:
                return _failed(session_factory, result, exc)
            log.error(
                "district %s: Clever no longer knows cursor %s (older than its 30-day window):"
                " the district needs a full resync",
                district_id,
                result.cursor,
            )
            result.outcome, result.error = "resync_needed", "cursor unknown to Clever (404)"
            _finish(session_factory, district_id, status="resync_needed", last_error=result.error)
            return result
        except CursorMoved:
            log.info(
                "district %s: another poller moved the cursor; leaving the feed to it", district_id
            )
            result.outcome = "raced"
            return result
        except (PollError, httpx.HTTPError) as exc:
            return _failed(session_factory, result, exc)
    _finish(session_factory, district_id, status="ok", unauthorized_passes=0, last_error=None)
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
    session_factory: SessionFactory, api: CleverEvents, result: PollResult
) -> PollResult:
    """A district's first pass records where its feed ends, without reading 30 days of history
    (``--from-start`` replays it on purpose)."""
    newest = api.newest()
    now = utcnow()
    with session_factory() as session:
        session.execute(
            update(PollCursor)
            .where(PollCursor.district_id == result.district_id, PollCursor.started_at.is_(None))
            .values(
                cursor=newest,
                started_at=now,
                status="ok",
                unauthorized_passes=0,
                last_error=None,
                last_success_at=now,
                updated_at=now,
            )
        )
    result.outcome, result.cursor = "started", newest
    log.info(
        "district %s: first pass, starting after the newest event %s",
        result.district_id,
        newest or "(the feed is empty)",
    )
    return result


def _read_feed(
    session_factory: SessionFactory,
    api: CleverEvents,
    result: PollResult,
    *,
    from_start: bool,
    send: Enqueue,
) -> None:
    expected = result.cursor  # what the cursor row holds: it moves only from there
    after = None if from_start else expected  # what the page asked for starts after
    uri: str | None = api.first_uri(after)
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


def _unauthorized(
    session_factory: SessionFactory, options: PollOptions, result: PollResult, exc: Exception
) -> PollResult:
    with session_factory() as session:
        row = session.scalar(
            select(PollCursor).where(PollCursor.district_id == result.district_id).with_for_update()
        )
        assert row is not None
        row.unauthorized_passes += 1
        row.last_error = str(exc)
        row.updated_at = utcnow()
        passes = row.unauthorized_passes
        if passes >= options.disconnect_after:
            row.status = "disconnected"
    result.error = str(exc)
    if passes >= options.disconnect_after:
        result.outcome = "disconnected"
        log.error(
            "district %s disconnected: Clever refused its token %d passes in a row; it is"
            " skipped until its token changes or an operator resets it",
            result.district_id,
            passes,
        )
    else:
        result.outcome = "unauthorized"
        log.warning(
            "district %s: Clever refused its token (%d of %d passes before disconnecting)",
            result.district_id,
            passes,
            options.disconnect_after,
        )
    return result


def _failed(session_factory: SessionFactory, result: PollResult, exc: BaseException) -> PollResult:
    result.outcome, result.error = "failed", _describe(exc)
    log.warning(
        "district %s: pass ended after %d page(s): %s; cursor stays at %s",
        result.district_id,
        result.pages,
        result.error,
        result.cursor,
    )
    _finish(session_factory, result.district_id, last_error=result.error)
    return result


def reset_district(session_factory: SessionFactory, district_id: str) -> bool:
    """An operator's reset: a disconnected or resync-needed district is polled again, from the
    newest event on (resync its roster first). False if the district was never polled."""
    with session_factory() as session:
        reset = session.scalar(
            update(PollCursor)
            .where(PollCursor.district_id == district_id)
            .values(
                status="ok",
                unauthorized_passes=0,
                cursor=None,
                started_at=None,
                last_error=None,
                updated_at=utcnow(),
            )
            .returning(PollCursor.district_id)
        )
    if reset is not None:
        log.warning("district %s reset by an operator: restarting at the newest event", district_id)
    return reset is not None


# --------------------------------------------------------------------------------------------
# Every district


def poll_all(
    session_factory: SessionFactory,
    tokens: Sequence[DistrictToken],
    *,
    options: PollOptions | None = None,
    from_start: bool = False,
    enqueue: Enqueue | None = None,
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
            result = PollResult(token.district_id, "failed", error=type(exc).__name__)
        results.append(result)
    return results
