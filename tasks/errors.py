"""Errors the units of work raise. Each is permanent unless it says otherwise."""

from __future__ import annotations

from models import DeadLetterReason


class GrassrootsError(Exception):
    """A request we cannot carry out; the message is safe to show an operator."""


class NotFound(GrassrootsError):
    pass


class RestoreRefused(GrassrootsError):
    pass


class Refused(GrassrootsError):
    """What is asked for does not fit the state of its subject (discarding an event that is
    neither held nor deferred)."""


class InvalidInput(GrassrootsError):
    """A value an operator gave that cannot be used (an instant that is no instant, a pause that
    ends before it starts, a percentage out of range): nothing is stored."""


class InvariantViolation(GrassrootsError):
    """Learner-owned data changed during a conversion: the whole conversion is rolled back."""

    reason = DeadLetterReason.INVARIANT_VIOLATED

    def __init__(self, account_ids: list[str]) -> None:
        self.account_ids = account_ids
        super().__init__(
            f"invariant_violated: learner-owned data of {len(account_ids)} account(s) would change"
            f" ({', '.join(account_ids[:5])}{'…' if len(account_ids) > 5 else ''})"
        )


class WaitForRoster(GrassrootsError):
    """An event names people whose own roster events have not been applied yet (events about
    different objects race between workers). Transient: the event is retried shortly."""
