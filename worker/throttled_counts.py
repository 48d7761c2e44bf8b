"""Counts of something a flood could make of every request (a refused signature, a cut
connection), by reason: kept for ``/metrics`` and logged, without a write or a log line per
request.

The counts live in Redis, in one hash per tally that every serving process adds to: a scrape of
any of them sees them all, and a restarted process loses nothing it had sent. Counting only adds
to its process's tally in memory (no I/O on the request's path); the tally is sent every few
seconds, at each scrape and at shutdown, and kept for the next try while Redis is away.

Logged at WARNING, throttled: the first of each reason at once, then at most one line per reason
per minute, with the count since the last one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import redis

log = logging.getLogger("grassroots.api")

LOG_EVERY = 60.0  # seconds between two lines about one reason
SEND_EVERY = 5.0  # seconds between two sends of a process's tally to Redis


class Tally:
    """One process's counts of one kind, by reason: counted, sent to Redis, logged."""

    # The Redis hash, and every reason it counts (each reported, 0 if none).
    key: str
    reasons: tuple[str, ...]

    def __init__(
        self, *, log_every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.log_every = log_every
        self._clock = clock
        # Taken by the event loop (``count``) and by the threads that send and scrape.
        self._lock = threading.Lock()
        self._unsent: Counter[str] = Counter()
        self._unlogged: Counter[str] = Counter()
        self._last_detail: dict[str, str] = {}
        self._logged_at: dict[str, float] = {}

    def first_line(self, reason: str, detail: str) -> str:
        """The line of a reason's first count."""
        raise NotImplementedError

    def later_line(self, count: int, reason: str, seconds: float, detail: str) -> str:
        """The line of the ``count`` more of a reason in the last ``seconds``."""
        raise NotImplementedError

    @property
    def unsent(self) -> int:
        with self._lock:
            return sum(self._unsent.values())

    def count(self, reason: str, detail: str = "") -> None:
        """Count one; log it if its reason's line is due. ``detail`` (never a request's
        content) goes into the next line about the reason."""
        with self._lock:
            self._unsent[reason] += 1
            self._unlogged[reason] += 1
            if detail:
                self._last_detail[reason] = detail
            self._log_if_due(reason, self._clock())

    def log_overdue(self) -> None:
        """Log what was counted since a reason's last line, once a minute has passed: a burst
        that stops is still reported."""
        with self._lock:
            now = self._clock()
            for reason in list(self._unlogged):
                self._log_if_due(reason, now)

    def _log_if_due(self, reason: str, now: float) -> None:
        last = self._logged_at.get(reason)
        if last is not None and now - last < self.log_every:
            return
        count = self._unlogged.pop(reason, 0)
        if not count:
            return
        self._logged_at[reason] = now
        detail = self._last_detail.pop(reason, "")
        line = (
            self.first_line(reason, detail)
            if last is None
            else self.later_line(count, reason, now - last, detail)
        )
        log.warning(line, extra={"reason": reason, "count": count})

    def send(self, client: redis.Redis) -> bool:
        """Add this process's tally to the shared counts; False (the tally kept for the next
        try) if Redis did not take it."""
        with self._lock:
            unsent, self._unsent = self._unsent, Counter()
        if not unsent:
            return True
        try:
            pipe = client.pipeline(transaction=False)
            for reason, count in unsent.items():
                pipe.hincrby(self.key, reason, count)
            pipe.execute()
        except redis.RedisError:
            with self._lock:
                self._unsent.update(unsent)
            return False
        return True

    def totals(self, client: redis.Redis) -> dict[str, int]:
        """Every process's counts so far, by reason (each known reason, 0 if none)."""
        found: dict[str, int] = {}
        for key, value in client.hgetall(self.key).items():
            found[key.decode() if isinstance(key, bytes) else str(key)] = int(value)
        return {reason: found.get(reason, 0) for reason in self.reasons}
