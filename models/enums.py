"""Every status, kind and role, once. Check constraints, metrics labels and CLI choices are built
from these; nothing else spells their values out.

``StrEnum`` members are ``str``: they compare equal to the stored text and bind as it.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class EventStatus(StrEnum):
    """A roster event in the inbox (SPEC §5.6)."""

    ACCEPTED = "accepted"  # in the inbox, not yet done
    PROCESSING = "processing"
    DONE = "done"
    IGNORED = "ignored"
    STALE = "stale"
    REJECTED = "rejected"
    DISCARDED = "discarded"
    HELD = "held"  # by the brake: an operator releases or discards it
    DEAD = "dead"  # dead-lettered: an operator replays it
    # A destructive change made while a pause covered its district: applied when the pause ends.
    DEFERRED = "deferred"

    @classmethod
    def final(cls) -> frozenset[EventStatus]:
        """Nothing more will happen to the event."""
        return frozenset({cls.DONE, cls.IGNORED, cls.STALE, cls.REJECTED, cls.DISCARDED})

    @classmethod
    def in_flight(cls) -> frozenset[EventStatus]:
        """The event is waiting for a worker or being worked on: counted in ``pending``."""
        return frozenset({cls.ACCEPTED, cls.PROCESSING})

    @classmethod
    def waiting_for_operator(cls) -> frozenset[EventStatus]:
        return frozenset({cls.HELD, cls.DEAD})

    @classmethod
    def waiting(cls) -> frozenset[EventStatus]:
        """Neither in flight nor final: for an operator, or for a pause to end. A worker that
        gets such an event has nothing to do."""
        return cls.waiting_for_operator() | {cls.DEFERRED}


class AccountKind(StrEnum):
    DISTRICT = "district"
    GRASSROOTS = "grassroots"


class AccountStatus(StrEnum):
    ACTIVE = "active"
    REMOVED = "removed"  # cannot log in (an admin removed under the `remove` policy)


class Role(StrEnum):
    """The platform's roles. An account may hold several."""

    ADMIN = "admin"
    TEACHER = "teacher"
    STUDENT = "student"


class CleverRole(StrEnum):
    """The roles of a Clever v3 ``User``; each role's own fields sit under its key."""

    DISTRICT_ADMIN = "district_admin"
    TEACHER = "teacher"
    STUDENT = "student"
    STAFF = "staff"
    CONTACT = "contact"


# Clever's five role names: a role Clever adds later is not among them, and is ignored (SPEC §4).
# StrEnum members hash and compare as their text: role names test in it.
CLEVER_ROLE_NAMES: frozenset[str] = frozenset(CleverRole)

# The Clever roles that make a platform role, and the role each makes (SPEC §4); staff and
# contacts make none.
_PLATFORM_ROLE: dict[str, Role] = {
    CleverRole.DISTRICT_ADMIN: Role.ADMIN,
    CleverRole.TEACHER: Role.TEACHER,
    CleverRole.STUDENT: Role.STUDENT,
}
_CLEVER_ROLE: dict[str, str] = {platform: clever for clever, platform in _PLATFORM_ROLE.items()}


def platform_roles(clever_roles: Iterable[str]) -> frozenset[Role]:
    """The platform roles a user holding these Clever roles (names) has: the one place the
    mapping is applied."""
    return frozenset(_PLATFORM_ROLE[r] for r in clever_roles if r in _PLATFORM_ROLE)


def clever_role(role: Role | str) -> CleverRole:
    """The Clever role that makes a platform role."""
    return CleverRole(_CLEVER_ROLE[role])


class DistrictStatus(StrEnum):
    ACTIVE = "active"
    EXITED = "exited"


class AdminRemoval(StrEnum):
    """A district's policy for admins who leave (SPEC §3)."""

    CONVERT = "convert"
    REMOVE = "remove"


class ExitStatus(StrEnum):
    RUNNING = "running"
    DONE = "done"


class UnitStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"


class UnitKind(StrEnum):
    TEACHER = "teacher"  # drop one teacher's district classes
    ACCOUNTS = "accounts"  # convert a batch of accounts


class JournalKind(StrEnum):
    """What a conversion journal entry's subject is."""

    ACCOUNT = "account"
    CLASS = "class"
    DISTRICT = "district"


class PollStatus(StrEnum):
    OK = "ok"  # polled every pass
    # Its token was refused pass after pass: skipped until the token changes or an operator
    # resets it.
    DISCONNECTED = "disconnected"
    # Clever no longer knows the cursor (older than its 30-day window): events were missed.
    RESYNC_NEEDED = "resync_needed"


class SyncStatus(StrEnum):
    """A roster sync from the Clever Data API (SPEC §5.8)."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class RequestKind(StrEnum):
    """An operator request that starts work no row yet describes (SPEC §6): it is a row of
    ``operator_requests`` before anything is sent to the broker."""

    EXIT = "exit"  # a district exit's start: plans its units
    SYNC = "sync"  # a district's roster sync


class RequestStatus(StrEnum):
    ASKED = "asked"  # written, and sent or to be sent again by the relay
    TAKEN = "taken"  # a worker has counted an attempt at it: the broker took it
    DONE = "done"
    DEAD = "dead"  # dead-lettered
    # The broker could not take it when it was asked, and the operator was told so: never sent.
    WITHDRAWN = "withdrawn"

    @classmethod
    def open(cls) -> frozenset[RequestStatus]:
        """A worker may still act on it."""
        return frozenset({cls.ASKED, cls.TAKEN})


class DeadLetterReason(StrEnum):
    """Why a task was dead-lettered (``DeadLetter.reason``)."""

    ERROR = "error"  # not transient: it would fail the same way again
    RETRIES_EXHAUSTED = "retries_exhausted"  # transient, but still failing after every retry
    # Started more than TASK_MAX_RETRIES + 1 times without finishing (its process ended each
    # time: killed, or stopped at TASK_TIME_LIMIT's hard limit, which the soft one did not reach).
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    # Outlived TASK_TIME_LIMIT's soft limit on its last attempt (a hung query or service).
    TIME_LIMIT = "time_limit"
    # The learner-data checksum would have changed: the work was rolled back (SPEC §3).
    INVARIANT_VIOLATED = "invariant_violated"


class AuditAction(StrEnum):
    """What an audit record (``AuditRecord.action``) says was done."""

    # Conversions (``tasks.conversion``) and the district exit
    CONVERT = "convert"
    REMOVE_CLASS = "remove_class"
    SHRINK_SECTION = "shrink_section"
    RESTORE = "restore"
    DISTRICT_EXIT = "district_exit"
    # Roster events (``tasks.events``)
    APPLY_EVENT = "apply_event"
    HOLD = "hold"
    DEFER = "defer"
    # An operator's word, or a pause's end
    RELEASE = "release"
    DISCARD = "discard"
    REPLAY = "replay"
    RESUME_EXIT = "resume_exit"
    POLICY = "policy"
    PAUSE = "pause"
    PAUSE_REMOVE = "pause_remove"
    OPERATOR_ADD = "operator-add"
    OPERATOR_REMOVE = "operator-remove"


class Mastery(StrEnum):
    ATTEMPTED = "attempted"
    FAMILIAR = "familiar"
    PROFICIENT = "proficient"
    MASTERED = "mastered"


def sql_in(column: str, values: Iterable[StrEnum]) -> str:
    """``column IN ('a', 'b')`` for a check constraint or an index's condition, from enum values
    (an enum's own: all of them, in their order)."""
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


class OperatorRole(StrEnum):
    """What a person signed in to the console (or holding an operator's token) may do (§5.9)."""

    VIEWER = "viewer"  # sees every page, changes nothing
    OPERATOR = "operator"  # may change
