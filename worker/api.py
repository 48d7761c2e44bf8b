"""The HTTP app (``grassroots serve``): the Clever webhook receiver (``worker.receiver``), the
operations API (``worker.ops_api``), health and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from tasks.errors import GrassrootsError, NotFound
from worker import intake, ops_api, receiver
from worker.broker import broker_client
from worker.db import NoStack
from worker.http import db, error
from worker.intake import DatabaseUnavailable
from worker.metrics import PipelineCollector


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


@app.exception_handler(DatabaseUnavailable)
@app.exception_handler(OperationalError)
async def _db_down(request: Request, exc: Exception) -> JSONResponse:
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


@app.exception_handler(ops_api.Unauthorized)
async def _unauthorized(request: Request, exc: ops_api.Unauthorized) -> JSONResponse:
    response = error(401, "unauthorized", str(exc))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


# A plain Starlette route: the handler reads the request itself, so FastAPI's per-request
# dependency and parameter machinery would be pure overhead on the busiest path. Exception
# handlers (503 for an unreachable database) and middleware apply as to every route.
app.add_route(
    "/webhooks/clever", receiver.clever_webhook, methods=["POST"], include_in_schema=False
)
app.include_router(ops_api.router)


@app.get("/metrics")
async def metrics() -> Response:
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


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
    try:
        await run_in_threadpool(lambda: broker_client().ping())
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)
