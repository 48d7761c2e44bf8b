"""The HTTP app (``grassroots serve``): the Clever webhook receiver (``worker.receiver``), the
operations API (``worker.ops_api``), the operators' console (``worker.console``), health and
metrics.

One app per set of routes (``Routes``): ``app`` serves everything; ``webhooks_app`` the webhook
and health only, for the listener Clever reaches; ``ops_app`` the ops API, the console, metrics
and health, for a listener only operators and Prometheus reach (``serve --ops-port`` runs both in
one process: ``worker.serving``). ``/metrics`` needs the ops token wherever it is served. Every
response carries the headers of ``worker.http.Hygiene``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import StrEnum

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.exc import DataError, OperationalError
from starlette.requests import ClientDisconnect

from tasks import heartbeat
from tasks.deadletters import describe
from tasks.errors import GrassrootsError, NotFound
from worker import connection_limits, intake, ops_api, receiver, rejections
from worker.broker import broker_client
from worker.console import STATIC
from worker.console import errors as console_errors
from worker.console import pages as console_pages
from worker.db import NoStack
from worker.http import BodyTooLarge, Hygiene, InputGuard, body_too_large, error
from worker.intake import DatabaseUnavailable, in_session
from worker.metrics import PipelineCollector
from worker.settings import Settings, get_settings
from worker.throttled_counts import SEND_EVERY, Tally


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


async def _send_tallies() -> None:
    """Every few seconds: the refused signatures and cut connections counted here go to Redis,
    and a reason whose count went on after its last log line gets its line once a minute."""
    while True:
        await asyncio.sleep(SEND_EVERY)
        await _flush_tallies()


def _counted_here() -> tuple[Tally, ...]:
    """What this process counts and sends: refused signatures, cut connections."""
    return rejections.REJECTIONS, connection_limits.CUTS


async def _flush_tallies() -> None:
    for tally in _counted_here():
        tally.log_overdue()
    if any(tally.unsent for tally in _counted_here()):
        await run_in_threadpool(_send_tallies_once)


def _send_tallies_once() -> None:
    # Redis away: the tallies are kept for the next try.
    client = broker_client()
    for tally in _counted_here():
        tally.send(client)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    global _started
    _started = time.monotonic()
    sending = asyncio.get_running_loop().create_task(_send_tallies())
    try:
        yield
    finally:
        sending.cancel()
        # Requests are answered once committed; what they left to send to the workers goes now.
        await intake.drain()
        await _flush_tallies()


registry = CollectorRegistry(auto_describe=True)
registry.register(PipelineCollector(uptime=uptime))


async def _unstorable(request: Request, exc: Exception) -> JSONResponse:
    # A value of the request the database cannot hold (a NUL in a JSON field or a form, text
    # past a column's length): the path and query are checked before any route (InputGuard);
    # what a body carries is refused here, for every route at once, instead of a 500.
    return error(
        400,
        "invalid_input",
        f"the database cannot store a value of this request: {describe(exc)[1]}",
    )


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


async def _aborted(request: Request, exc: ClientDisconnect) -> Response:
    # Counted and logged once a minute (``worker.connection_limits``), never a traceback each;
    # no one is left to read the answer.
    connection_limits.CUTS.count(connection_limits.Cut.ABORTED)
    return Response(status_code=400)


async def metrics() -> Response:
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def healthz() -> dict[str, str]:
    return {"status": "ok"}


class Readiness:
    """Database and broker reachable, and a worker taking work from the events queue (its
    heartbeat no older than HEARTBEAT_MAX_AGE). The answer is kept ``cache_seconds``: a flood
    of probes makes one check a second, on pooled database and Redis connections, never one
    per probe."""

    cache_seconds = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # When, under which settings, and what.
        self._answer: tuple[float, Settings, tuple[dict[str, object], int]] | None = None

    def fresh(self) -> tuple[dict[str, object], int] | None:
        kept = self._answer
        if kept is None:
            return None
        at, settings, answer = kept
        if time.monotonic() - at >= self.cache_seconds or settings is not get_settings():
            return None
        return answer

    def check(self) -> tuple[dict[str, object], int]:
        # One check at a time: the probes that waited for it take its answer.
        with self._lock:
            answer = self.fresh()
            if answer is None:
                settings = get_settings()
                answer = _check_readiness()
                self._answer = (time.monotonic(), settings, answer)
            return answer


def _check_readiness() -> tuple[dict[str, object], int]:
    checks: dict[str, str] = {}
    ready = True
    try:
        age = in_session(heartbeat.age)
        checks["database"] = "ok"
        found = heartbeat.verdict(age, max_age=get_settings().heartbeat_max_age, uptime=uptime())
        checks["heartbeat"] = found.check
        ready = found.ready
    except DatabaseUnavailable as exc:
        checks["database"] = f"unavailable: {exc}"
        checks["heartbeat"] = "unknown: the database is unavailable"
        ready = False
    try:
        broker_client().ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
        ready = False
    return {"ready": ready, **checks}, 200 if ready else 503


READINESS = Readiness()


async def readyz() -> JSONResponse:
    """Database and broker reachable, and a worker taking work (``Readiness``)."""
    answer = READINESS.fresh()
    if answer is None:
        answer = await run_in_threadpool(READINESS.check)
    body, status = answer
    return JSONResponse(body, status_code=status)


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
    served.add_exception_handler(DataError, _unstorable)
    served.add_exception_handler(NoStack, _no_stack)  # type: ignore[arg-type]
    served.add_exception_handler(NotFound, _not_found)  # type: ignore[arg-type]
    served.add_exception_handler(GrassrootsError, _refused)  # type: ignore[arg-type]
    served.add_exception_handler(ops_api.Unauthorized, _unauthorized)  # type: ignore[arg-type]
    served.add_exception_handler(ops_api.Forbidden, _forbidden)  # type: ignore[arg-type]
    served.add_exception_handler(BodyTooLarge, body_too_large)
    served.add_exception_handler(ClientDisconnect, _aborted)  # type: ignore[arg-type]
    served.add_middleware(InputGuard)
    console_errors.install(served)
    # Outermost (added last): its headers go on InputGuard's refusals too.
    served.add_middleware(Hygiene)
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
