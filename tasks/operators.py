"""Operators as people (SPEC §5.6 ``operator …``, §5.9): their tokens, their console sessions,
the name the audit log gives what they change, and the slowing of repeated failed sign-ins.

A token is ``<key>.<secret>``, shown once. The ``key`` finds the operator (a bearer token comes
without a name); only an argon2 hash of the whole token is stored. A console session is a random
secret in a cookie; its row keeps only the secret's SHA-256, which is enough for 256 random bits.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import AuditAction, AuditRecord, ConsoleSession, Operator, OperatorRole, utcnow
from models.operator import NAME_LENGTH
from tasks.errors import InvalidInput, NotFound, Refused

# Letters, digits and . _ @ -: a name is safe in a URL, a log-free audit trigger and a form.
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._@-]{{0,{NAME_LENGTH - 1}}}")
# A session ends after this long without a request (SPEC §5.9).
IDLE = timedelta(hours=12)
# ``last_seen_at`` is written at most this often: a page view is not a write each time.
TOUCH_EVERY = timedelta(minutes=1)

_hasher = PasswordHasher()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"an operator's name is 1 to {NAME_LENGTH} letters, digits, '.', '_', '@' or '-',"
            " starting with a letter or digit"
        )
    return name


def _audit(session: Session, action: AuditAction, name: str, by: str, **details: Any) -> None:
    session.add(
        AuditRecord(
            action=action, trigger=by, subject_type="operator", subject_id=name, details=details
        )
    )


def add(session: Session, name: str, role: OperatorRole, *, by: str) -> str:
    """A new operator; its token, which nothing keeps (only its hash is stored)."""
    check_name(name)
    key = secrets.token_hex(8)
    token = f"{key}.{secrets.token_urlsafe(32)}"
    try:
        with session.begin_nested():
            session.add(Operator(name=name, role=role, key=key, token_hash=_hasher.hash(token)))
    except IntegrityError:
        raise Refused(f"there is already an operator named {name}") from None
    _audit(session, AuditAction.OPERATOR_ADD, name, by, role=str(role))
    return token


def listed(session: Session) -> list[dict[str, Any]]:
    """Every operator, by name: ``operator list --json``."""
    return [
        {
            "name": o.name,
            "role": o.role,
            "created_at": o.created_at.isoformat(),
            "last_seen_at": o.last_seen_at.isoformat() if o.last_seen_at else None,
        }
        for o in session.scalars(select(Operator).order_by(Operator.name))
    ]


def remove(session: Session, name: str, *, by: str) -> None:
    """The operator goes, and with it its token and every session it had, at once."""
    found = session.scalar(select(Operator).where(Operator.name == name))
    if found is None:
        raise NotFound(f"no operator {name}")
    session.execute(delete(ConsoleSession).where(ConsoleSession.operator_id == found.id))
    session.delete(found)
    _audit(session, AuditAction.OPERATOR_REMOVE, name, by)


# Tokens that matched their stored hash lately: argon2 is slow on purpose, and a script's every
# request to the ops API need not pay it again. Keyed by the stored hash too, so a removed
# operator (no row, no hash) is refused at once.
_VERIFIED_MAX = 1024
_verified: OrderedDict[tuple[str, str], None] = OrderedDict()


def _matches(operator: Operator, token: str) -> bool:
    seen = (operator.token_hash, hashlib.sha256(token.encode()).hexdigest())
    if seen in _verified:
        _verified.move_to_end(seen)
        return True
    try:
        _hasher.verify(operator.token_hash, token)
    except (VerificationError, InvalidHashError):
        return False
    _verified[seen] = None
    if len(_verified) > _VERIFIED_MAX:
        _verified.popitem(last=False)
    return True


@functools.cache
def _decoy() -> str:
    return _hasher.hash(secrets.token_urlsafe(32))


def _verify_decoy(token: str) -> None:
    """An argon2 verification that always fails, as long as a real one takes."""
    with contextlib.suppress(VerificationError, InvalidHashError):
        _hasher.verify(_decoy(), token)


def _touch(operator: Operator, now: datetime) -> None:
    if operator.last_seen_at is None or now - operator.last_seen_at >= TOUCH_EVERY:
        operator.last_seen_at = now


@dataclass(frozen=True)
class Identity:
    """Who is asking: an operator by name, or the deployment's ``OPS_TOKEN`` (``name`` None)."""

    name: str | None
    role: OperatorRole

    @property
    def may_change(self) -> bool:
        return self.role == OperatorRole.OPERATOR

    def trigger(self, via: str, action: str) -> str:
        """What the audit log records as the trigger of a change this caller makes."""
        if self.name is None:
            return f"{via}:{action}"
        return f"operator:{self.name}:{via}:{action}"


AUTOMATION = Identity(None, OperatorRole.OPERATOR)


def who(trigger: str) -> str:
    """The one who did it, from an audit trigger: an operator's name, or what stands for the
    deployment (``ops`` for OPS_TOKEN, ``cli`` for a shell, ``event:…``, ``exit:…``)."""
    if trigger.startswith("operator:"):
        return trigger.split(":", 2)[1]
    return trigger.split(":", 1)[0]


def by_token(session: Session, token: str, *, now: datetime | None = None) -> Identity | None:
    """The operator whose token this is (a bearer on the ops API), or None."""
    key, dot, _ = token.partition(".")
    if not dot:
        return None
    operator = session.scalar(select(Operator).where(Operator.key == key))
    if operator is None or not _matches(operator, token):
        return None
    _touch(operator, now or utcnow())
    return Identity(operator.name, OperatorRole(operator.role))


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Opened:
    """A session just opened: the cookie's secret (kept nowhere else) and its CSRF token."""

    secret: str
    csrf: str


def sign_in(
    session: Session, name: str, token: str, *, now: datetime | None = None
) -> Opened | None:
    """A new console session for the operator with this name and token, or None: the caller
    says the same for a wrong name as for a wrong token."""
    operator = session.scalar(select(Operator).where(Operator.name == name))
    if operator is None:
        # As long as a wrong token takes: the answer's time does not tell which names exist.
        _verify_decoy(token)
        return None
    if not _matches(operator, token):
        return None
    at = now or utcnow()
    operator.last_seen_at = at
    opened = Opened(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
    session.add(
        ConsoleSession(
            id=_hash(opened.secret),
            operator_id=operator.id,
            csrf=opened.csrf,
            created_at=at,
            last_seen_at=at,
        )
    )
    return opened


@dataclass(frozen=True)
class SignedIn:
    identity: Identity
    csrf: str

    def csrf_matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())


def signed_in(
    session: Session, secret: str, *, now: datetime | None = None, active: bool = True
) -> SignedIn | None:
    """The session this cookie's secret opened, if it is still open: not signed out, its
    operator not removed, and not idle for ``IDLE``. An idle one is closed. ``active`` False (a
    page refreshing itself) reads the session without counting as the operator's activity."""
    at = now or utcnow()
    row = session.get(ConsoleSession, _hash(secret))
    if row is None:
        return None
    if at - row.last_seen_at > IDLE:
        session.delete(row)
        return None
    operator = session.get(Operator, row.operator_id)
    if operator is None:
        return None
    if active:
        if at - row.last_seen_at >= TOUCH_EVERY:
            row.last_seen_at = at
        _touch(operator, at)
    return SignedIn(Identity(operator.name, OperatorRole(operator.role)), row.csrf)


def sign_out(session: Session, secret: str) -> None:
    session.execute(delete(ConsoleSession).where(ConsoleSession.id == _hash(secret)))


class Throttle:
    """Failed sign-ins counted per key (a name, an address): after ``free`` failures, each
    further attempt must wait twice as long as the one before (up to ``cap`` seconds) or is
    refused unchecked. Bounded: the least recently failed keys are forgotten first."""

    def __init__(
        self, *, free: int = 5, cap: float = 300.0, window: float = 900.0, keys: int = 10000
    ) -> None:
        self.free, self.cap, self.window, self.keys = free, cap, window, keys
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def wait(self, *keys: str, now: float | None = None) -> float:
        """Seconds before these keys may try again (0: now)."""
        at = time.monotonic() if now is None else now
        longest = 0.0
        for key in keys:
            count, last = self._failures.get(key, (0, 0.0))
            if count < self.free or at - last > self.window:
                continue
            delay = min(self.cap, 2.0 ** (count - self.free))
            longest = max(longest, last + delay - at)
        return max(longest, 0.0)

    def failed(self, *keys: str, now: float | None = None) -> None:
        at = time.monotonic() if now is None else now
        for key in keys:
            count, last = self._failures.pop(key, (0, 0.0))
            self._failures[key] = (1 if at - last > self.window else count + 1, at)
        while len(self._failures) > self.keys:
            self._failures.popitem(last=False)

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._failures.pop(key, None)
