"""Webhooks refused for their signature (the receiver's 401s), by reason: counted for
``/metrics`` and logged, so that a receiver whose clock drifted past the 5-minute tolerance, or a
sender signing with a secret we do not hold, is seen instead of silently refusing everything.

The counts live in Redis, in one hash that every receiver process adds to: a scrape of any of
them sees them all, and a restarted process loses nothing it had sent. A refusal only adds to its
process's tally in memory (no I/O on the request's path, where a flood of bad requests would
become a flood of Redis writes); the tally is sent every few seconds, at each scrape and at
shutdown, and kept for the next try while Redis is away.

Logged at WARNING, throttled: the first refusal of each reason at once, then at most one line
per reason per minute, with the count since the last one. Never the body, nor a header's value
(a ``webhook-timestamp`` that is not a number is the sender's text: only its reason is logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import get_args

import redis

from worker.signing import Reason, SignatureError

log = logging.getLogger("grassroots.api")

KEY = "grassroots:webhook_signature_rejections"
REASONS: tuple[str, ...] = get_args(Reason)
LOG_EVERY = 60.0  # seconds between two lines about one reason
SEND_EVERY = 5.0  # seconds between two sends of a process's tally to Redis


class Rejections:
    """One process's refused signatures: counted, sent to Redis, logged."""

    def __init__(
        self, *, log_every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.log_every = log_every
        self._clock = clock
        # Taken by the event loop (``add``) and by the threads that send and scrape.
        self._lock = threading.Lock()
        self._unsent: Counter[str] = Counter()
        self._unlogged: Counter[str] = Counter()
        self._last_message: dict[str, str] = {}
        self._logged_at: dict[str, float] = {}

    @property
    def unsent(self) -> int:
        with self._lock:
            return sum(self._unsent.values())

    def add(self, exc: SignatureError) -> None:
        """Count one refusal; log it if its reason's line is due."""
        reason = exc.reason
        with self._lock:
            self._unsent[reason] += 1
            self._unlogged[reason] += 1
            if reason != "bad_timestamp":
                self._last_message[reason] = str(exc)
            self._log_if_due(reason, self._clock())

    def log_overdue(self) -> None:
        """Log the refusals counted since a reason's last line, once a minute has passed: a
        burst that stops is still reported."""
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
        detail = self._last_message.pop(reason, "")
        fields = {"reason": reason, "count": count}
        if last is None:
            log.warning(
                "webhook refused with 401 (%s)%s; further refusals are counted in /metrics and"
                " logged at most once a minute per reason",
                reason,
                f": {detail}" if detail else "",
                extra=fields,
            )
        else:
            log.warning(
                "%d webhook(s) refused with 401 (%s) in the last %.0f s%s",
                count,
                reason,
                now - last,
                f"; the last: {detail}" if detail else "",
                extra=fields,
            )

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
                pipe.hincrby(KEY, reason, count)
            pipe.execute()
        except redis.RedisError:
            with self._lock:
                self._unsent.update(unsent)
            return False
        return True


def totals(client: redis.Redis) -> dict[str, int]:
    """Every receiver's refusals so far, by reason (each known reason, 0 if none)."""
    found: dict[str, int] = {}
    for key, value in client.hgetall(KEY).items():
        found[key.decode() if isinstance(key, bytes) else str(key)] = int(value)
    return {reason: found.get(reason, 0) for reason in REASONS}


# This process's: the receiver counts into it, its lifespan and /metrics send it.
REJECTIONS = Rejections()
