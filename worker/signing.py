"""Standard Webhooks signatures (SPEC §5.2; https://www.standardwebhooks.com).

A message is signed as ``v1,<base64 HMAC-SHA256(key, "{msg_id}.{timestamp}.{body}")>``, where the
key is the base64 part of a ``whsec_`` secret. The behaviour follows the reference libraries in
github.com/standard-webhooks/standard-webhooks, and the tests replay their published vectors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from secrets import token_bytes, token_urlsafe
from typing import Literal

__all__ = [
    "DEFAULT_TOLERANCE",
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SignatureError",
    "decode_secret",
    "generate_secret",
    "sign",
    "signed_headers",
    "verify",
]

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
DEFAULT_TOLERANCE = 300

_SECRET_PREFIX = "whsec_"  # noqa: S105 -- the public marker of a secret, not a secret
_VERSION = "v1"
# Unix seconds as plain digits. Bounding the length keeps int() cheap on hostile input; 15 digits
# is millions of years, so any real timestamp fits and a longer one could never be fresh.
_TIMESTAMP = re.compile(r"[0-9]{1,15}")

Reason = Literal[
    "missing_headers", "bad_timestamp", "stale_timestamp", "bad_signature", "no_secret"
]


class SignatureError(Exception):
    """A webhook failed verification; ``reason`` is stable for metrics, ``str()`` is for people."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


def decode_secret(secret: str) -> bytes:
    """Return the HMAC key of a ``whsec_<base64>`` secret (bare base64 is accepted too)."""
    encoded = secret.removeprefix(_SECRET_PREFIX)
    # Like the reference Python library, accept secrets whose trailing "=" padding was dropped.
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except ValueError:
        # The secret itself stays out of the message: it ends up in logs.
        raise ValueError(
            f"webhook secret is not valid base64 (expected {_SECRET_PREFIX}<base64>)"
        ) from None
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def generate_secret() -> str:
    """A fresh secret: 32 random bytes, inside the 24–64 byte range the spec asks for."""
    return _SECRET_PREFIX + base64.b64encode(token_bytes(32)).decode("ascii")


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    # The body is signed as raw bytes: decoding and re-encoding it could change what was signed.
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one message under one secret."""
    return f"{_VERSION},{_signature(decode_secret(secret), msg_id, timestamp, body)}"


def signed_headers(
    secret: str, body: bytes, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    """Headers that make ``body`` pass :func:`verify` under ``secret``."""
    if msg_id is None:
        msg_id = f"msg_{token_urlsafe(18)}"
    if timestamp is None:
        timestamp = int(time.time())
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: sign(secret, msg_id, timestamp, body),
    }


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance: int = DEFAULT_TOLERANCE,
) -> str:
    """Check a delivery against any of ``secrets`` and return its ``webhook-id``.

    Raises :class:`SignatureError` when the delivery is not authentic or not fresh, and
    ``ValueError`` when a configured secret is malformed: that is our fault, not the sender's.
    """
    # A lone str is a Sequence[str] too; iterating it would try each character as a secret.
    if isinstance(secrets, str):
        raise TypeError("secrets must be a sequence of secrets, not a single string")
    keys = [decode_secret(secret) for secret in secrets]
    if not keys:
        raise SignatureError("no_secret", "no webhook secret is configured")

    # HTTP header names are case-insensitive, but a plain dict lookup is not.
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get(HEADER_ID, "")
    raw_timestamp = lowered.get(HEADER_TIMESTAMP, "")
    signature_header = lowered.get(HEADER_SIGNATURE, "")
    missing = [
        name
        for name, value in (
            (HEADER_ID, msg_id),
            (HEADER_TIMESTAMP, raw_timestamp),
            (HEADER_SIGNATURE, signature_header),
        )
        if not value
    ]
    if missing:
        raise SignatureError("missing_headers", f"missing webhook headers: {', '.join(missing)}")

    if not _TIMESTAMP.fullmatch(raw_timestamp):
        raise SignatureError(
            "bad_timestamp", f"{HEADER_TIMESTAMP} is not a unix time in seconds: {raw_timestamp!r}"
        )
    timestamp = int(raw_timestamp)
    # Both directions are checked: a far-future timestamp would let a captured request be
    # replayed for as long as it stays "fresh".
    age = (time.time() if now is None else now) - timestamp
    if age > tolerance:
        raise SignatureError(
            "stale_timestamp", f"{HEADER_TIMESTAMP} is {age:.0f}s old, over the {tolerance}s limit"
        )
    if -age > tolerance:
        raise SignatureError(
            "stale_timestamp",
            f"{HEADER_TIMESTAMP} is {-age:.0f}s in the future, over the {tolerance}s limit",
        )

    # One expected value per secret, so a sender still signing with the old secret during a
    # rotation passes as well as one already on the new secret.
    expected = [_signature(key, msg_id, timestamp, body).encode("ascii") for key in keys]
    # The header may carry several space-separated "<version>,<signature>" entries (the sender's
    # own rotation). Only "v1" is HMAC-SHA256; other versions, such as "v1a" (ed25519), are
    # skipped rather than rejected so that senders can add schemes without breaking us.
    for entry in signature_header.split():
        version, _, candidate = entry.partition(",")
        if version != _VERSION or not candidate:
            continue
        # Compare the base64 text, as the reference libraries do, so that attacker-supplied bytes
        # are never decoded; compare_digest keeps the comparison constant-time.
        candidate_bytes = candidate.encode()
        if any(hmac.compare_digest(candidate_bytes, wanted) for wanted in expected):
            return msg_id
    raise SignatureError(
        "bad_signature", f"no {_VERSION} signature in {HEADER_SIGNATURE} matches a known secret"
    )
