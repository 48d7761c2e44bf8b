"""The HTTP app (``grassroots serve``): the Clever webhook receiver (``worker.receiver``), the
operations API (``worker.ops_api``), the operators' console (``worker.console``), health and
metrics.

One app per set of routes (``Routes``): ``app`` serves everything; ``webhooks_app`` the webhook
and health only, for the listener Clever reaches; ``ops_app`` the ops API, the console, metrics
and health, for a listener only operators and Prometheus reach. ``/metrics`` needs the ops token
wherever it is served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import StrEnum

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.exc import OperationalError

from tasks import heartbeat
from tasks.errors import GrassrootsError, NotFound
from worker import intake, ops_api, receiver, rejections
from worker.broker import broker_client
from worker.console import STATIC
from worker.console import errors as console_errors
from worker.console import pages as console_pages
from worker.db import NoStack
from worker.http import BodyTooLarge, InputGuard, body_too_large, db, error
from worker.intake import DatabaseUnavailable
from worker.metrics import PipelineCollector
from worker.settings import get_settings


class Routes(StrEnum):
    """What a listener serves (``grassroots serve --routes``); health on every one."""

    ALL = "all"
    WEBHOOKS = "webhooks"  # POST /webhooks/clever
    OPS = "ops"  # /ops/…, /metrics


# When this process started serving: a deployment that never saw a heartbeat is not called
# unready before its workers have had HEARTBEAT_MAX_AGE to start.
_started = time.monotonic()


def uptime() -> float:
    return time.monotonic() - _started


async def _send_rejections() -> None:
    """Every few seconds: the refused signatures counted here go to Redis, and a reason whose
    refusals went on after its last log line gets its line once a minute."""
    while True:
        await asyncio.sleep(rejections.SEND_EVERY)
        rejections.REJECTIONS.log_overdue()
        if rejections.REJECTIONS.unsent:
            await run_in_threadpool(_send_rejections_once)


def _send_rejections_once() -> None:
    # Redis away: the tally is kept for the next try.
    rejections.REJECTIONS.send(broker_client())


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global _started
    _started = time.monotonic()
    sending = asyncio.get_running_loop().create_task(_send_rejections())
    try:
        yield
    finally:
        sending.cancel()
        # Requests are answered once committed; what they left to send to the workers goes now.
        await intake.drain()
        rejections.REJECTIONS.log_overdue()
        if rejections.REJECTIONS.unsent:
            await run_in_threadpool(_send_rejections_once)


registry = CollectorRegistry(auto_describe=True)
registry.register(PipelineCollector(uptime=uptime))


async def _db_down(request: Request, exc: Exception) -> JSONResponse:
    return error(503, "database_unavailable", "the database is unreachable; try again")


async def _no_stack(request: Request, exc: NoStack) -> JSONResponse:
    return error(503, "not_configured", str(exc))


def _on_console(request: Request) -> bool:
    return request.url.path.startswith("/console/")


async def _not_found(request: Request, exc: NotFound) -> Response:
    if _on_console(request):
        return console_errors.page(request, 404, "Not found", str(exc))
    return error(404, "not_found", str(exc))


async def _refused(request: Request, exc: GrassrootsError) -> Response:
    if _on_console(request):
        return console_errors.page(request, 409, "Refused", str(exc))
    return error(409, "refused", str(exc))


async def _unauthorized(request: Request, exc: ops_api.Unauthorized) -> JSONResponse:
    response = error(401, "unauthorized", str(exc))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def _forbidden(request: Request, exc: ops_api.Forbidden) -> JSONResponse:
    return error(403, "forbidden", str(exc))


async def metrics() -> Response:
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readyz() -> JSONResponse:
    """Database and broker reachable, and a worker taking work from the events queue (its
    heartbeat no older than HEARTBEAT_MAX_AGE)."""
    checks: dict[str, str] = {}
    ready = True
    try:
        age = await db(heartbeat.age)
        checks["database"] = "ok"
        found = heartbeat.verdict(age, max_age=get_settings().heartbeat_max_age, uptime=uptime())
        checks["heartbeat"] = found.check
        ready = found.ready
    except DatabaseUnavailable as exc:
        checks["database"] = f"unavailable: {exc}"
        checks["heartbeat"] = "unknown: the database is unavailable"
        ready = False
    try:
        await run_in_threadpool(lambda: broker_client().ping())
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
        ready = False
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)


def create_app(routes: Routes = Routes.ALL) -> FastAPI:
    # No public API description: everything under /ops is behind the token.
    served = FastAPI(
        title="grassroots",
        version="0.1.0",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    served.add_exception_handler(DatabaseUnavailable, _db_down)
    served.add_exception_handler(OperationalError, _db_down)
    served.add_exception_handler(NoStack, _no_stack)  # type: ignore[arg-type]
    served.add_exception_handler(NotFound, _not_found)  # type: ignore[arg-type]
    served.add_exception_handler(GrassrootsError, _refused)  # type: ignore[arg-type]
    served.add_exception_handler(ops_api.Unauthorized, _unauthorized)  # type: ignore[arg-type]
    served.add_exception_handler(ops_api.Forbidden, _forbidden)  # type: ignore[arg-type]
    served.add_exception_handler(BodyTooLarge, body_too_large)
    served.add_middleware(InputGuard)
    console_errors.install(served)
    if routes in (Routes.ALL, Routes.WEBHOOKS):
        # A plain Starlette route: the handler reads the request itself, so FastAPI's
        # per-request dependency and parameter machinery would be pure overhead on the busiest
        # path. Exception handlers (503 for an unreachable database) and middleware apply as to
        # every route.
        served.add_route(
            "/webhooks/clever", receiver.clever_webhook, methods=["POST"], include_in_schema=False
        )
    if routes in (Routes.ALL, Routes.OPS):
        served.include_router(ops_api.router)
        served.include_router(console_pages.router)
        served.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
        # Behind the ops token: what it tells (event types, districts, volumes) is the
        # operators', and an open scrape would let anyone make the database work.
        served.add_api_route(
            "/metrics", metrics, methods=["GET"], dependencies=[Depends(ops_api.require_token)]
        )
    served.add_api_route("/healthz", healthz, methods=["GET"])
    served.add_api_route("/readyz", readyz, methods=["GET"])
    return served


app = create_app()
webhooks_app = create_app(Routes.WEBHOOKS)
ops_app = create_app(Routes.OPS)
