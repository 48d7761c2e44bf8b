"""A client of Clever's API (v3.0), one district token at a time: what the Events API poller
(``worker.poller``) and any other reader of a district's data share.

Each request is rate-limited on our side (Clever's published limit per token), retried on 429
(until ``X-RateLimit-Reset``), 5xx, timeouts and network errors, and bounded in time. Lists are
read page by page (``page``): a page's ``data`` list and its ``links`` ``rel=next``, followed only
on the API's own host, or the token would go with it. Single objects are read with ``get``.

Tokens come from ``CLEVER_DISTRICT_TOKENS`` only and never reach a log line, an error message or
the database (a row that must notice a replaced token keeps its SHA-256: ``fingerprint``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self, TypeVar

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from tasks.inbox import NotJson, parse_json
from worker.settings import DEFAULT_CLEVER_API_BASE, ConfigError, Settings

log = logging.getLogger("grassroots.clever")
T = TypeVar("T")

# Clever's published limit for a district token.
RATE_LIMIT = 1200
RATE_PERIOD = 60.0


# --------------------------------------------------------------------------------------------
# Tokens


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
class ClientOptions:
    base_url: str = DEFAULT_CLEVER_API_BASE
    # Explicit timeouts: a Clever that stops answering must not hang a pass (or a worker) forever.
    timeout: httpx.Timeout = field(
        default_factory=lambda: httpx.Timeout(connect=5.0, read=30.0, write=10.0, pool=5.0)
    )
    # Tries per request: 5xx, timeouts and 429s share this budget.
    attempts: int = 6
    backoff: float = 0.5
    backoff_max: float = 30.0
    # A 429 whose reset is further away than this ends the request; the next pass resumes.
    max_rate_limit_wait: float = 300.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(base_url=settings.clever_api_base)


# --------------------------------------------------------------------------------------------
# Client-side rate limit


class RateLimiter:
    """At most ``limit`` requests in any ``period`` seconds (a sliding window, so a burst at the
    end of one minute and another at the start of the next cannot add up to twice the limit).

    Per process: requests in other processes that share a token are kept in line by Clever's 429s.
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
# Errors


class CleverError(Exception):
    """Why a request to Clever failed; the message holds no token and no personal data."""


class CleverUnauthorized(CleverError):
    pass


class CleverNotFound(CleverError):
    pass


class RateLimited(CleverError):
    def __init__(self, wait: float) -> None:
        super().__init__(f"rate limited for {wait:.1f} s")
        self.wait = wait


class ServerError(CleverError):
    """Worth retrying: a 5xx, or a body that is not the JSON Clever promises."""


class ClientError(CleverError):
    """Not worth retrying: an unexpected 4xx, or a link that leaves the API."""


# Worth another try: Clever or the network hiccuped. Anything else fails the request.
RETRYABLE = (
    ServerError,
    RateLimited,
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


def describe_error(exc: BaseException | None) -> str:
    """A failed request, in words safe for a log line or an operator."""
    if isinstance(exc, CleverError):
        return str(exc)
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return type(exc).__name__


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


# --------------------------------------------------------------------------------------------
# The client


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_uri: str | None


def _next_link(body: dict[str, Any]) -> str | None:
    links = body.get("links")
    return next(
        (
            link["uri"]
            for link in (links if isinstance(links, list) else [])
            if isinstance(link, dict)
            and link.get("rel") == "next"
            and isinstance(link.get("uri"), str)
        ),
        None,
    )


class CleverClient:
    """Reads one district's data with its token: rate-limited, retried, bounded in time."""

    def __init__(
        self,
        token: DistrictToken,
        options: ClientOptions,
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

    def __enter__(self) -> CleverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # requests -----------------------------------------------------------------------------

    def get(self, uri: str) -> dict[str, Any]:
        """The JSON object at ``uri`` (a path on the API, or a link it gave)."""
        return self._retried(uri, self._object)

    def page(self, uri: str) -> Page:
        """One page of a list: its items (``data``) and the link to the next page, if any."""
        return self._retried(uri, self._page)

    def _retried(self, uri: str, read: Callable[[httpx.URL], T]) -> T:
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
                return read(url)
        raise AssertionError("unreachable")  # pragma: no cover

    def _url(self, uri: str) -> httpx.URL:
        """Clever's links are paths on the API host; anything else would receive the token."""
        if uri.startswith("/"):
            return httpx.URL(self._base + uri)
        url = httpx.URL(uri)
        if url.copy_with(path="/", query=None) != self._origin:
            raise ClientError("a next link points away from CLEVER_API_BASE; not followed")
        return url

    def _object(self, url: httpx.URL) -> dict[str, Any]:
        self._limiter.acquire()
        response = self._http.get(url)
        status = response.status_code
        if status == 401:
            raise CleverUnauthorized("Clever refused the district token (401)")
        if status == 404:
            raise CleverNotFound("Clever answered 404")
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
        if not isinstance(body, dict):
            raise ServerError("Clever answered a page that is not a JSON object")
        return body

    def _page(self, url: httpx.URL) -> Page:
        body = self._object(url)
        if not isinstance(body.get("data"), list):
            raise ServerError("Clever answered a page without a 'data' list")
        return Page(body["data"], _next_link(body))

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
            describe_error(exc),
            state.attempt_number,
            wait,
        )
