"""Standard Webhooks signing, checked against the vectors the reference libraries publish.

The vectors come from github.com/standard-webhooks/standard-webhooks: the signing vector is the one
shared by libraries/python/tests/test_webhooks.py (test_sign_function),
libraries/javascript/src/webhook.test.ts ("sign function works") and
libraries/go/webhook_test.go (TestWebhookSign); the forged signatures are the ones those files use
for their invalid-signature and multi-signature cases. The reference tests build headers at the
current time; here the clock is pinned with ``now=`` instead.
"""

from __future__ import annotations

import base64

import pytest
from starlette.datastructures import Headers

from worker.signing import (
    SignatureError,
    decode_secret,
    generate_secret,
    sign,
    signed_headers,
    verify,
)

# The reference libraries' shared fixture.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BARE_SECRET = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
PAYLOAD = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

# Forged signatures from the reference tests.
PYTHON_NEAR_MISS = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="  # last character differs
GO_FORGED = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
JS_GARBAGE = "v1,dawfeoifkpqwoekfpqoekf"
# The asymmetric (ed25519) entry from the spec's example webhook-signature header.
SPEC_V1A = (
    "v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5BdqzCInXqYXFymVJaA7AZdpXwVLPo3mNl8EM+m7TBAg=="
)

OTHER_SECRET = "whsec_" + base64.b64encode(b"another endpoint's 32-byte key!!").decode()


def reference_headers(signature: str = SIGNATURE) -> dict[str, str]:
    return {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(TIMESTAMP),
        "webhook-signature": signature,
    }


def rejection(
    headers: dict[str, str],
    *,
    secrets: list[str] | None = None,
    body: bytes = PAYLOAD,
    now: float = TIMESTAMP,
) -> SignatureError:
    with pytest.raises(SignatureError) as caught:
        verify([SECRET] if secrets is None else secrets, headers, body, now=now)
    return caught.value


# --- signing ---------------------------------------------------------------------------------


def test_sign_reproduces_reference_vector() -> None:
    assert sign(SECRET, MSG_ID, TIMESTAMP, PAYLOAD) == SIGNATURE


def test_sign_accepts_secret_without_whsec_prefix() -> None:
    assert sign(BARE_SECRET, MSG_ID, TIMESTAMP, PAYLOAD) == SIGNATURE


def test_sign_covers_raw_bytes_that_are_not_utf8() -> None:
    signature = sign(SECRET, MSG_ID, TIMESTAMP, b"\xff\xfe")
    headers = reference_headers(signature)
    assert verify([SECRET], headers, b"\xff\xfe", now=TIMESTAMP) == MSG_ID


def test_signed_headers_with_fixed_id_and_time_match_reference_vector() -> None:
    assert signed_headers(SECRET, PAYLOAD, msg_id=MSG_ID, timestamp=TIMESTAMP) == (
        reference_headers()
    )


def test_signed_headers_defaults_produce_a_verifiable_fresh_message() -> None:
    headers = signed_headers(SECRET, PAYLOAD)
    msg_id = verify([SECRET], headers, PAYLOAD)
    assert msg_id == headers["webhook-id"]
    assert msg_id.startswith("msg_")
    assert "." not in msg_id  # the spec forbids dots: they would blur the signed string's fields


def test_signed_headers_defaults_give_each_message_its_own_id() -> None:
    first = signed_headers(SECRET, PAYLOAD)["webhook-id"]
    second = signed_headers(SECRET, PAYLOAD)["webhook-id"]
    assert first != second


# --- secrets ---------------------------------------------------------------------------------


def test_decode_secret_gives_same_key_with_and_without_prefix() -> None:
    key = decode_secret(SECRET)
    assert key == decode_secret(BARE_SECRET)
    assert key == base64.b64decode(BARE_SECRET)
    assert len(key) == 24


def test_decode_secret_accepts_unpadded_base64() -> None:
    padded = "whsec_" + base64.b64encode(b"twenty-five bytes of key!").decode()
    assert padded.endswith("=")
    assert decode_secret(padded.rstrip("=")) == b"twenty-five bytes of key!"


@pytest.mark.parametrize(
    "secret",
    ["whsec_not base64!", "whsec_MfKQ9r8G*YqrTwjU", "whsec_abcde", "whsec_émoji"],
)
def test_decode_secret_rejects_invalid_base64_without_echoing_it(secret: str) -> None:
    with pytest.raises(ValueError, match="not valid base64") as caught:
        decode_secret(secret)
    assert secret.removeprefix("whsec_") not in str(caught.value)


@pytest.mark.parametrize("secret", ["", "whsec_"])
def test_decode_secret_rejects_empty_key(secret: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        decode_secret(secret)


def test_generate_secret_is_prefixed_32_random_bytes() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(decode_secret(secret)) == 32
    assert generate_secret() != secret


def test_generated_secret_signs_and_verifies() -> None:
    secret = generate_secret()
    headers = signed_headers(secret, PAYLOAD, msg_id=MSG_ID, timestamp=TIMESTAMP)
    assert verify([secret], headers, PAYLOAD, now=TIMESTAMP) == MSG_ID


# --- verification: success -------------------------------------------------------------------


def test_verify_accepts_reference_vector_and_returns_message_id() -> None:
    assert verify([SECRET], reference_headers(), PAYLOAD, now=TIMESTAMP) == MSG_ID


def test_verify_accepts_secret_without_whsec_prefix() -> None:
    assert verify([BARE_SECRET], reference_headers(), PAYLOAD, now=TIMESTAMP) == MSG_ID


def test_verify_reads_header_names_case_insensitively() -> None:
    headers = {
        "Webhook-Id": MSG_ID,
        "WEBHOOK-TIMESTAMP": str(TIMESTAMP),
        "webhook-Signature": SIGNATURE,
    }
    assert verify([SECRET], headers, PAYLOAD, now=TIMESTAMP) == MSG_ID


def test_verify_accepts_starlette_request_headers() -> None:
    raw = [(name.title().encode(), value.encode()) for name, value in reference_headers().items()]
    assert verify([SECRET], Headers(raw=raw), PAYLOAD, now=TIMESTAMP) == MSG_ID


def test_verify_accepts_one_valid_signature_among_reference_decoys() -> None:
    # The list from the reference multi-signature tests, plus the spec's v1a example entry.
    decoys_then_valid = [GO_FORGED, GO_FORGED.replace("v1,", "v2,"), SPEC_V1A, SIGNATURE, GO_FORGED]
    headers = reference_headers(" ".join(decoys_then_valid))
    assert verify([SECRET], headers, PAYLOAD, now=TIMESTAMP) == MSG_ID


def test_verify_skips_malformed_entries_before_a_valid_one() -> None:
    headers = reference_headers(f"v1, v1 garbage ,,, {SIGNATURE}")
    assert verify([SECRET], headers, PAYLOAD, now=TIMESTAMP) == MSG_ID


def test_verify_accepts_message_signed_with_any_configured_secret() -> None:
    # Our side of a rotation: the new secret is configured before the sender switches to it.
    for configured in ([OTHER_SECRET, SECRET], [SECRET, OTHER_SECRET]):
        assert verify(configured, reference_headers(), PAYLOAD, now=TIMESTAMP) == MSG_ID


def test_verify_accepts_sender_signing_with_old_and_new_secret() -> None:
    # The sender's side of a rotation: both signatures travel in one header.
    both = f"{sign(OTHER_SECRET, MSG_ID, TIMESTAMP, PAYLOAD)} {SIGNATURE}"
    assert verify([SECRET], reference_headers(both), PAYLOAD, now=TIMESTAMP) == MSG_ID
    assert verify([OTHER_SECRET], reference_headers(both), PAYLOAD, now=TIMESTAMP) == MSG_ID


@pytest.mark.parametrize("offset", [-300, -299.5, 0, 299.5, 300])
def test_verify_accepts_timestamps_within_tolerance(offset: float) -> None:
    assert verify([SECRET], reference_headers(), PAYLOAD, now=TIMESTAMP + offset) == MSG_ID


def test_verify_honours_custom_tolerance() -> None:
    now = TIMESTAMP + 3600
    assert verify([SECRET], reference_headers(), PAYLOAD, now=now, tolerance=3600) == MSG_ID
    with pytest.raises(SignatureError):
        verify([SECRET], reference_headers(), PAYLOAD, now=now, tolerance=3599)


# --- verification: failures ------------------------------------------------------------------


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_missing_header(header: str) -> None:
    headers = reference_headers()
    del headers[header]
    error = rejection(headers)
    assert error.reason == "missing_headers"
    assert header in str(error)


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_empty_header(header: str) -> None:
    headers = reference_headers()
    headers[header] = ""
    assert rejection(headers).reason == "missing_headers"


def test_verify_names_every_missing_header() -> None:
    error = rejection({})
    assert error.reason == "missing_headers"
    assert str(error) == (
        "missing webhook headers: webhook-id, webhook-timestamp, webhook-signature"
    )


@pytest.mark.parametrize("value", ["hello", "1614265330.5", "-1614265330", " 1614265330", "1e9"])
def test_verify_rejects_timestamp_that_is_not_unix_seconds(value: str) -> None:
    headers = reference_headers()
    headers["webhook-timestamp"] = value
    assert rejection(headers).reason == "bad_timestamp"


def test_verify_rejects_timestamp_too_old() -> None:
    # The reference tests use tolerance + 1 second.
    error = rejection(reference_headers(), now=TIMESTAMP + 301)
    assert error.reason == "stale_timestamp"
    assert "301s old" in str(error)


def test_verify_rejects_timestamp_too_far_in_future() -> None:
    error = rejection(reference_headers(), now=TIMESTAMP - 301)
    assert error.reason == "stale_timestamp"
    assert "in the future" in str(error)


def test_verify_rejects_timestamp_just_past_tolerance() -> None:
    assert rejection(reference_headers(), now=TIMESTAMP + 300.001).reason == "stale_timestamp"


def test_verify_checks_tolerance_before_signature() -> None:
    # A replayed request from long ago is reported as stale, whatever its signature.
    headers = reference_headers(GO_FORGED)
    assert rejection(headers, now=TIMESTAMP + 86_400).reason == "stale_timestamp"


@pytest.mark.parametrize(
    "signature",
    [
        PYTHON_NEAR_MISS,
        GO_FORGED,
        JS_GARBAGE,
        SIGNATURE[:8],  # the JavaScript "partial signature" case
        "v1,",
        SIGNATURE[:-1],
        SIGNATURE + "A",
        SIGNATURE.removeprefix("v1,"),
        " ",
    ],
)
def test_verify_rejects_forged_or_truncated_signature(signature: str) -> None:
    error = rejection(reference_headers(signature))
    assert error.reason == "bad_signature"


@pytest.mark.parametrize("version", ["v1a", "v2", "V1", "v0"])
def test_verify_ignores_valid_hmac_under_other_version(version: str) -> None:
    relabelled = SIGNATURE.replace("v1,", f"{version},", 1)
    assert rejection(reference_headers(relabelled)).reason == "bad_signature"


def test_verify_ignores_spec_v1a_entry_when_no_v1_matches() -> None:
    assert rejection(reference_headers(f"{SPEC_V1A} {GO_FORGED}")).reason == "bad_signature"


def test_verify_rejects_message_signed_with_unknown_secret() -> None:
    assert rejection(reference_headers(), secrets=[OTHER_SECRET]).reason == "bad_signature"


def test_verify_rejects_tampered_body() -> None:
    assert rejection(reference_headers(), body=b'{"test": 2432232315}').reason == "bad_signature"


def test_verify_rejects_body_with_whitespace_changed() -> None:
    # Re-serialised JSON is the classic cause of failed verification; the raw body must be used.
    assert rejection(reference_headers(), body=b'{"test":2432232314}').reason == "bad_signature"


def test_verify_rejects_changed_message_id() -> None:
    headers = reference_headers()
    headers["webhook-id"] = "msg_p5jXN8AQM9LWM0D4loKWxJel"
    assert rejection(headers).reason == "bad_signature"


def test_verify_rejects_changed_timestamp_even_when_fresh() -> None:
    # Go's "invalid timestamp fails when ignoring tolerance": the timestamp is part of what is
    # signed, so moving it (here to 2000-01-01) breaks the signature even at a matching clock.
    headers = reference_headers()
    headers["webhook-timestamp"] = "946684800"
    assert rejection(headers, now=946684800).reason == "bad_signature"


def test_verify_without_secrets_rejects_everything() -> None:
    error = rejection(reference_headers(), secrets=[])
    assert error.reason == "no_secret"
    assert str(error) == "no webhook secret is configured"


def test_verify_refuses_a_single_string_as_secret_list() -> None:
    with pytest.raises(TypeError, match="sequence of secrets"):
        verify(SECRET, reference_headers(), PAYLOAD, now=TIMESTAMP)


def test_verify_raises_value_error_for_malformed_configured_secret() -> None:
    # A broken secret is our configuration error, not the sender's bad signature.
    with pytest.raises(ValueError, match="not valid base64"):
        verify([SECRET, "whsec_???"], reference_headers(), PAYLOAD, now=TIMESTAMP)


def test_signature_error_messages_are_one_line_and_never_contain_the_secret() -> None:
    errors = [
        rejection({}),
        rejection(reference_headers(), now=TIMESTAMP + 301),
        rejection(reference_headers(GO_FORGED)),
        rejection(reference_headers(), secrets=[]),
    ]
    for error in errors:
        message = str(error)
        assert message
        assert "\n" not in message
        assert BARE_SECRET not in message
