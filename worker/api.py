"""The HTTP side: the Clever webhook receiver (SPEC §5.2) and the operations API (SPEC §5.5)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from kombu.exceptions import OperationalError as BrokerError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BeforeValidator
from redis.exceptions import RedisError
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from models import RosterEvent
from tasks import jobs
from tasks.errors import GrassrootsError, NotFound
from tasks.inbox import BadEvent, NotJson, inbox_row, parse_json
from worker import intake, signing
from worker.db import NoStack
from worker.intake import DatabaseUnavailable, in_session
from worker.metrics import PipelineCollector
from worker.settings import get_settings

log = logging.getLogger("grassroots.api")
MAX_BODY = 1024 * 1024
T = TypeVar("T")


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


async def db(fn: Callable[[Session], T]) -> T:
    return await run_in_threadpool(in_session, fn)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    yield
    # Requests are answered once committed; what they left to send to the workers goes now.
    await intake.drain()


# No public API description: everything under /ops is behind the token.
app = FastAPI(
    title="grassroots",
    version="0.1.0",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    lifespan=lifespan,
)
registry = CollectorRegistry(auto_describe=True)
registry.register(PipelineCollector())


@app.get("/metrics")
async def metrics() -> Response:
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@app.exception_handler(DatabaseUnavailable)
async def _db_down(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
    return error(503, "database_unavailable", "the database is unreachable; try again")


@app.exception_handler(NoStack)
async def _no_stack(request: Request, exc: NoStack) -> JSONResponse:
    return error(503, "not_configured", str(exc))


@app.exception_handler(NotFound)
async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
    return error(404, "not_found", str(exc))


@app.exception_handler(GrassrootsError)
async def _refused(request: Request, exc: GrassrootsError) -> JSONResponse:
    return error(409, "refused", str(exc))


# --------------------------------------------------------------------------------------------
# Webhook receiver


async def _read_body(request: Request) -> bytes | None:
    """The body, or None once it passes 1 MiB: counted while reading, whatever the headers say."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            return None
    return bytes(body)


async def clever_webhook(request: Request) -> Response:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        return error(415, "unsupported_media_type", "send the event as application/json")
    body = await _read_body(request)
    if body is None:
        return error(413, "body_too_large", "the body is over 1 MiB")
    secrets = get_settings().webhook_secrets
    if not secrets:
        log.error("WEBHOOK_SECRETS is not set: every webhook is refused")
        return error(503, "not_configured", "the receiver has no webhook secret configured")
    try:
        signing.verify(secrets, request.headers, body)
    except signing.SignatureError as exc:
        return error(401, exc.reason, str(exc))
    except ValueError:
        log.error("WEBHOOK_SECRETS holds a secret that is not base64: every webhook is refused")
        return error(503, "not_configured", "the receiver's webhook secret is malformed")
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


# A plain Starlette route: the handler reads the request itself, so FastAPI's per-request
# dependency and parameter machinery would be pure overhead on the busiest path. Exception
# handlers (503 for an unreachable database) and middleware apply as to every route.
app.add_route("/webhooks/clever", clever_webhook, methods=["POST"], include_in_schema=False)


# --------------------------------------------------------------------------------------------
# Health


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz")
async def readyz() -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        await db(lambda session: session.execute(text("SELECT 1")))
        checks["database"] = "ok"
    except DatabaseUnavailable as exc:
        checks["database"] = f"unavailable: {exc}"

    def ping_broker() -> None:
        from worker.ops import broker_client

        broker_client().ping()

    try:
        await run_in_threadpool(ping_broker)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)


# --------------------------------------------------------------------------------------------
# Operations API


_BEARER_HINT = "send 'Authorization: Bearer <OPS_TOKEN>'"


def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
    # One code (SPEC §5.5: 401 "unauthorized"); the message tells a caller who sent nothing
    # from one whose token is wrong, and both from a server that has no token to compare.
    token = get_settings().ops_token
    scheme, _, given = (authorization or "").partition(" ")
    if not token:
        raise _Unauthorized("this server has no OPS_TOKEN set: its ops API refuses every request")
    if authorization is None or not authorization.strip():
        raise _Unauthorized(f"no bearer token: {_BEARER_HINT}")
    if scheme.lower() != "bearer" or not given.strip():
        raise _Unauthorized(f"the Authorization header holds no bearer token: {_BEARER_HINT}")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise _Unauthorized("the bearer token is not this server's OPS_TOKEN")


class _Unauthorized(Exception):
    pass


@app.exception_handler(_Unauthorized)
async def _unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
    response = error(401, "unauthorized", str(exc))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


Ops = Annotated[None, Depends(require_token)]


@app.get("/ops/status")
async def ops_status(_: Ops) -> dict[str, Any]:
    from worker.ops import pipeline_status

    return await db(lambda session: pipeline_status(session))


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value


@app.get("/ops/events")
async def ops_events(
    _: Ops,
    status: str | None = None,
    type: str | None = None,
    limit: Annotated[int | None, Query(ge=1, le=1000), BeforeValidator(_blank_is_none)] = None,
) -> list[dict[str, Any]]:
    from worker.ops import event_row, list_events

    # Left blank (?status=&type=&limit=), a filter or the limit is not given.
    rows = limit or 100
    return await db(
        lambda session: [
            event_row(ev)
            for ev in list_events(session, status=status or None, type_=type or None, limit=rows)
        ]
    )


@app.get("/ops/events/{event_id}")
async def ops_event(_: Ops, event_id: str) -> dict[str, Any]:
    from worker.ops import event_detail

    def read(session: Session) -> dict[str, Any]:
        ev = session.scalar(select(RosterEvent).where(RosterEvent.id == event_id))
        if ev is None:
            raise NotFound(f"no event {event_id}")
        return event_detail(session, ev)

    return await db(read)


@app.post("/ops/events/{event_id}/replay", status_code=202)
async def ops_replay(_: Ops, event_id: str) -> JSONResponse:
    from tasks.events import REPLAYED, mark_replay

    outcome = await db(lambda session: mark_replay(session, event_id, by="ops:replay"))
    if outcome == REPLAYED:
        await run_in_threadpool(jobs.enqueue_events, [event_id])
    return JSONResponse(
        {"event": event_id, "replayed": outcome == REPLAYED, "status": outcome},
        status_code=202,
    )


@app.get("/ops/accounts/{account_id}")
async def ops_account(_: Ops, account_id: str) -> dict[str, Any]:
    from tasks.view import account_view

    return await db(lambda session: account_view(session, account_id))


@app.get("/ops/accounts/{account_id}/district-reports")
async def ops_district_reports(_: Ops, account_id: str) -> JSONResponse:
    from tasks.view import DISTRICT_ACCESS_ENDED, find_account, reports_allowed

    def check(session: Session) -> tuple[bool, bool, str]:
        account = find_account(session, account_id)
        in_program = account.kind == "district" and account.status == "active"
        return reports_allowed(session, account), in_program, account.district_id or ""

    allowed, in_program, district = await db(check)
    if allowed:
        return JSONResponse({"account": account_id, "district": district, "access": "allowed"})
    if in_program:
        return error(403, "not_a_district_admin", "district reports are open to district admins")
    return error(403, "district_access_ended", DISTRICT_ACCESS_ENDED)


@app.get("/ops/districts/{district_id}/preview")
async def ops_preview(_: Ops, district_id: str) -> dict[str, Any]:
    from tasks.view import preview_exit

    return await db(lambda session: preview_exit(session, district_id))


@app.post("/ops/districts/{district_id}/exit", status_code=202)
async def ops_exit(_: Ops, district_id: str) -> JSONResponse:
    from models import District

    def known(session: Session) -> bool:
        return session.get(District, district_id) is not None

    if not await db(known):
        raise NotFound(f"no district {district_id}")
    try:
        await run_in_threadpool(
            lambda: jobs.district_exit.apply_async((district_id, "ops:district-exit"))
        )
    except (BrokerError, RedisError, OSError):
        return error(
            503, "broker_unavailable", "the broker is unreachable; the exit was not started"
        )
    return JSONResponse({"district": district_id, "status": "started"}, status_code=202)


@app.get("/ops/districts/{district_id}/exit")
async def ops_exit_progress(_: Ops, district_id: str) -> JSONResponse:
    from tasks.exits import progress

    found = await db(lambda session: progress(session, district_id))
    if found is None:
        raise NotFound(f"district {district_id} has no exit")
    return JSONResponse(found.as_dict())
