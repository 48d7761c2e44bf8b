"""The operations API (SPEC §5.4, §5.5), behind ``Authorization: Bearer $OPS_TOKEN``: thin routes
over the read models (``tasks.view``, ``tasks.status``, ``tasks.exits``) and the operator actions
(``worker.services``)."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator
from sqlalchemy.orm import Session

from models import AccountKind, AccountStatus
from tasks import deadletters, exits, status, view
from tasks import sync as reconciling
from tasks.errors import NotFound
from worker import services, sync
from worker.http import db, error
from worker.settings import get_settings
from worker.status import pipeline_status

_BEARER_HINT = "send 'Authorization: Bearer <OPS_TOKEN>'"


class Unauthorized(Exception):
    """Answered 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``."""


def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
    # One code (SPEC §5.5: 401 "unauthorized"); the message tells a caller who sent nothing
    # from one whose token is wrong, and both from a server that has no token to compare.
    token = get_settings().ops_token
    scheme, _, given = (authorization or "").partition(" ")
    if not token:
        raise Unauthorized("this server has no OPS_TOKEN set: its ops API refuses every request")
    if authorization is None or not authorization.strip():
        raise Unauthorized(f"no bearer token: {_BEARER_HINT}")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized(f"the Authorization header holds no bearer token: {_BEARER_HINT}")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("the bearer token is not this server's OPS_TOKEN")


router = APIRouter(prefix="/ops", dependencies=[Depends(require_token)])


@router.get("/status")
async def ops_status() -> dict[str, Any]:
    return await db(pipeline_status)


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value


@router.get("/events")
async def ops_events(
    status_: Annotated[str | None, Query(alias="status")] = None,
    type_: Annotated[str | None, Query(alias="type")] = None,
    limit: Annotated[int | None, Query(ge=1, le=1000), BeforeValidator(_blank_is_none)] = None,
) -> list[dict[str, Any]]:
    # Left blank (?status=&type=&limit=), a filter or the limit is not given.
    return await db(
        lambda session: status.list_events(
            session, status=status_ or None, type_=type_ or None, limit=limit or 100
        )
    )


@router.get("/events/{event_id}")
async def ops_event(event_id: str) -> dict[str, Any]:
    found = await db(lambda session: status.event_detail(session, event_id))
    if found is None:
        raise NotFound(f"no event {event_id}")
    return found


@router.post("/events/{event_id}/replay", status_code=202)
async def ops_replay(event_id: str) -> JSONResponse:
    result = await run_in_threadpool(services.replay, [event_id], by="ops:replay")
    outcome = result.outcomes[event_id]
    return JSONResponse(
        {"event": event_id, "replayed": outcome == deadletters.REPLAYED, "status": outcome},
        status_code=202,
    )


@router.get("/accounts/{account_id}")
async def ops_account(account_id: str) -> dict[str, Any]:
    return await db(lambda session: view.account_view(session, account_id))


@router.get("/accounts/{account_id}/district-reports")
async def ops_district_reports(account_id: str) -> JSONResponse:
    def check(session: Session) -> tuple[bool, bool, str]:
        account = view.find_account(session, account_id)
        in_program = account.kind == AccountKind.DISTRICT and account.status == AccountStatus.ACTIVE
        return view.reports_allowed(session, account), in_program, account.district_id or ""

    allowed, in_program, district = await db(check)
    if allowed:
        return JSONResponse({"account": account_id, "district": district, "access": "allowed"})
    if in_program:
        return error(403, "not_a_district_admin", "district reports are open to district admins")
    return error(403, "district_access_ended", view.DISTRICT_ACCESS_ENDED)


@router.get("/districts/{district_id}/preview")
async def ops_preview(district_id: str) -> dict[str, Any]:
    return await db(lambda session: view.preview_exit(session, district_id))


@router.post("/districts/{district_id}/exit", status_code=202)
async def ops_exit(district_id: str) -> JSONResponse:
    try:
        await run_in_threadpool(services.start_exit, district_id, by="ops:district-exit")
    except services.BrokerUnavailable as exc:
        return error(503, "broker_unavailable", str(exc))
    return JSONResponse({"district": district_id, "status": "started"}, status_code=202)


@router.get("/districts/{district_id}/exit")
async def ops_exit_progress(district_id: str) -> JSONResponse:
    found = await db(lambda session: exits.progress(session, district_id))
    if found is None:
        raise NotFound(f"district {district_id} has no exit")
    return JSONResponse(found.as_dict())


@router.post("/districts/{district_id}/sync", status_code=202)
async def ops_sync(
    district_id: str,
    dry_run: bool = False,
) -> JSONResponse:
    try:
        sync_id = await run_in_threadpool(sync.request, district_id, dry_run=dry_run, trigger="ops")
    except services.BrokerUnavailable as exc:
        return error(503, "broker_unavailable", str(exc))
    return JSONResponse({"district": district_id, "sync_id": sync_id}, status_code=202)


@router.get("/districts/{district_id}/sync")
async def ops_sync_report(district_id: str) -> dict[str, Any]:
    found = await db(lambda session: reconciling.latest(session, district_id))
    if found is None:
        raise NotFound(f"district {district_id} has no sync")
    return found
