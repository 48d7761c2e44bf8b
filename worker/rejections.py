"""Webhooks refused for their signature (the receiver's 401s), by reason: counted for
``/metrics`` and logged, so that a receiver whose clock drifted past the 5-minute tolerance, or a
sender signing with a secret we do not hold, is seen instead of silently refusing everything.

The counts live in Redis, in one hash that every receiver process adds to: a scrape of any of
them sees them all, and a restarted process loses nothing it had sent. A refusal only adds to its
process's tally in memory (no I/O on the request's path, where a flood of bad requests would
become a flood of Redis writes); the tally is sent every few seconds, at each scrape and at
shutdown, and kept for the next try while Redis is away.

Logged at WARNING, throttled: the first refusal of each reason at once, then at most one line
per reason per minute, with the count since the last one (``worker.throttled_counts``). Never
the body, nor a header's value (a ``webhook-timestamp`` that is not a number is the sender's
text: only its reason is logged).
"""

from __future__ import annotations

from typing import get_args

import redis

from worker.signing import Reason, SignatureError
from worker.throttled_counts import Tally

KEY = "grassroots:webhook_signature_rejections"
REASONS: tuple[str, ...] = get_args(Reason)


class Rejections(Tally):
    """One process's refused signatures: counted, sent to Redis, logged."""

    key = KEY
    reasons = REASONS

    def add(self, exc: SignatureError) -> None:
        """Count one refusal; log it if its reason's line is due."""
        # A timestamp that is not a number is the sender's text: only its reason is logged.
        self.count(exc.reason, "" if exc.reason == "bad_timestamp" else str(exc))

    def first_line(self, reason: str, detail: str) -> str:
        return (
            f"webhook refused with 401 ({reason}){f': {detail}' if detail else ''}; further"
            " refusals are counted in /metrics and logged at most once a minute per reason"
        )

    def later_line(self, count: int, reason: str, seconds: float, detail: str) -> str:
        return (
            f"{count} webhook(s) refused with 401 ({reason}) in the last {seconds:.0f} s"
            f"{f'; the last: {detail}' if detail else ''}"
        )


def totals(client: redis.Redis) -> dict[str, int]:
    """Every receiver's refusals so far, by reason (each known reason, 0 if none)."""
    return REJECTIONS.totals(client)


# This process's: the receiver counts into it, its lifespan and /metrics send it.
REJECTIONS = Rejections()
