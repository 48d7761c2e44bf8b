"""The Clever webhook receiver (SPEC §5.2): verify, validate, commit to the inbox, answer, then
send the new events to the workers (``worker.intake``)."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tasks.inbox import BadEvent, NotJson, inbox_row, parse_json
from worker import intake, rejections, signing
from worker.http import error
from worker.settings import get_settings

log = logging.getLogger("grassroots.api")


async def clever_webhook(request: Request) -> Response:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        return error(415, "unsupported_media_type", "send the event as application/json")
    # Over 1 MiB, the read raises ``BodyTooLarge``: 413 (``worker.http.InputGuard``).
    body = await request.body()
    secrets = get_settings().webhook_secrets
    if not secrets:
        log.error("WEBHOOK_SECRETS is not set: every webhook is refused")
        return error(503, "not_configured", "the receiver has no webhook secret configured")
    # The settings refused a malformed secret before the receiver started: verify raises
    # nothing but SignatureError here.
    try:
        signing.verify(secrets, request.headers, body)
    except signing.SignatureError as exc:
        rejections.REJECTIONS.add(exc)
        return error(401, exc.reason, str(exc))
    try:
        raw = parse_json(body)
    except NotJson as exc:
        return error(400, "invalid_json", f"the body is not JSON we can store: {exc}")
    try:
        row = inbox_row(raw, source="webhook")
    except BadEvent as exc:
        return error(400, "invalid_event", str(exc))
    # Committed with whatever else is queued; new events are sent to the workers after that.
    stored = await intake.writer().store(row, size=len(body))
    return JSONResponse(
        {"event": stored.event_id, "status": "accepted" if stored.new else "duplicate"},
        status_code=202,
    )
