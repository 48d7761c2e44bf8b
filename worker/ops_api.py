"""The operations API (SPEC §5.4, §5.5), behind ``Authorization: Bearer $OPS_TOKEN``: thin routes
over the read models (``tasks.view``, ``tasks.status``, ``tasks.exits``) and the operator actions
(``worker.services``)."""

from __future__ import annotations

import hmac
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator
from sqlalchemy.orm import Session

from models import AccountKind, AccountStatus
from tasks import deadletters, exits, operators, pauses, roster_syncs, status, view
from tasks.errors import InvalidInput, NotFound
from tasks.inbox import NotJson, parse_json
from worker import services, sync
from worker.http import db, error
from worker.pipeline import pipeline_status
from worker.settings import get_settings

_BEARER_HINT = "send 'Authorization: Bearer <OPS_TOKEN>'"


class Unauthorized(Exception):
    """Answered 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``."""


class Forbidden(Exception):
    """Answered 403 ``forbidden``: a viewer asked for a change (nothing changed)."""


# An operator's token (``tasks.operators``): ``<16 hex>.<secret>``. Only a token of that shape is
# looked up, so junk costs no database round trip.
_OPERATOR_TOKEN = re.compile(r"[0-9a-f]{16}\.[A-Za-z0-9_-]{20,}")
_READING = frozenset({"GET", "HEAD", "OPTIONS"})


async def require_token(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> operators.Identity:
    """Who is asking: the deployment's OPS_TOKEN, or an operator by its token. A viewer's
    change is refused before it runs."""
    # One code (SPEC §5.5: 401 "unauthorized"); the message tells a caller who sent nothing
    # from one whose token is wrong, and both from a server that has no token to compare.
    token = get_settings().ops_token
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    if authorization is None or not authorization.strip():
        if not token:
            raise Unauthorized(_UNSET)
        raise Unauthorized(f"no bearer token: {_BEARER_HINT}")
    if scheme.lower() != "bearer" or not given:
        if not token:
            raise Unauthorized(_UNSET)
        raise Unauthorized(f"the Authorization header holds no bearer token: {_BEARER_HINT}")
    if token and hmac.compare_digest(given.encode(), token.encode()):
        identity = operators.AUTOMATION
    elif _OPERATOR_TOKEN.fullmatch(given) and (
        found := await db(lambda session: operators.by_token(session, given))
    ):
        identity = found
    elif not token:
        raise Unauthorized(_UNSET)
    else:
        raise Unauthorized("the bearer token is not this server's OPS_TOKEN nor an operator's")
    if request.method not in _READING and not identity.may_change:
        raise Forbidden("this operator is a viewer: it may read, not change")
    return identity


_UNSET = "this server has no OPS_TOKEN set: its ops API refuses every request"
Caller = Annotated[operators.Identity, Depends(require_token)]


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
async def ops_replay(event_id: str, caller: Caller) -> JSONResponse:
    by = caller.trigger("ops", "replay")
    result = await run_in_threadpool(services.replay, [event_id], by=by)
    outcome = result.outcomes[event_id]
    return JSONResponse(
        {"event": event_id, "replayed": outcome == deadletters.REPLAYED, "status": outcome},
        status_code=202,
    )


@router.get("/dead-letters")
async def ops_dead_letter_groups() -> list[dict[str, Any]]:
    """Open dead letters grouped by task and error class (the console's Dead letters page)."""
    return await db(deadletters.groups)


class GroupReplay(BaseModel):
    task: str
    error: str
    up_to: int


@router.post("/dead-letters/replay", status_code=202)
async def ops_replay_group(group: GroupReplay, caller: Caller) -> JSONResponse:
    """Replay all of a group's dead events with ids up to ``up_to`` (as ``GET`` showed it)."""
    by = caller.trigger("ops", "replay")
    result = await run_in_threadpool(
        lambda: services.replay_group(task=group.task, error=group.error, up_to=group.up_to, by=by)
    )
    return JSONResponse({"replayed": result.replayed, "outcomes": result.outcomes}, status_code=202)


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
async def ops_exit(district_id: str, caller: Caller) -> JSONResponse:
    try:
        await run_in_threadpool(
            services.start_exit, district_id, by=caller.trigger("ops", "district-exit")
        )
    except services.BrokerUnavailable as exc:
        return error(503, "broker_unavailable", str(exc))
    return JSONResponse({"district": district_id, "status": "started"}, status_code=202)


@router.post("/districts/{district_id}/exit/resume", status_code=202)
async def ops_exit_resume(district_id: str, caller: Caller) -> JSONResponse:
    try:
        resumed = await run_in_threadpool(
            services.resume_exit, district_id, by=caller.trigger("ops", "district-resume")
        )
    except services.BrokerUnavailable as exc:
        return error(503, "broker_unavailable", str(exc))
    return JSONResponse(
        {"district": district_id, "exit": resumed.exit_id, "units": resumed.units},
        status_code=202,
    )


@router.get("/districts/{district_id}/exit")
async def ops_exit_progress(district_id: str) -> JSONResponse:
    found = await db(lambda session: exits.progress(session, district_id))
    if found is None:
        raise NotFound(f"district {district_id} has no exit")
    return JSONResponse(found.as_dict())


@router.post("/districts/{district_id}/sync", status_code=202)
async def ops_sync(
    district_id: str,
    caller: Caller,
    dry_run: bool = False,
) -> JSONResponse:
    # A sync's trigger column is short: a long name is cut, the audit keeps it whole.
    trigger = "ops" if caller.name is None else caller.trigger("ops", "sync")[:64]
    try:
        sync_id = await run_in_threadpool(
            sync.request, district_id, dry_run=dry_run, trigger=trigger
        )
    except services.BrokerUnavailable as exc:
        return error(503, "broker_unavailable", str(exc))
    return JSONResponse({"district": district_id, "sync_id": sync_id}, status_code=202)


@router.get("/districts/{district_id}/sync")
async def ops_sync_report(district_id: str) -> dict[str, Any]:
    found = await db(lambda session: roster_syncs.latest(session, district_id))
    if found is None:
        raise NotFound(f"district {district_id} has no sync")
    return found


@router.post("/events/{event_id}/discard")
async def ops_discard(event_id: str, caller: Caller) -> dict[str, Any]:
    """A held or deferred event dropped for good (``grassroots events discard``)."""
    was = await run_in_threadpool(
        services.discard_event, event_id, by=caller.trigger("ops", "discard")
    )
    return {"event": event_id, "status": "discarded", "was": was}


# --------------------------------------------------------------------------------------------
# Roster pauses (SPEC §4 "Pauses", §5.5)


@router.get("/pauses")
async def ops_pauses() -> list[dict[str, Any]]:
    return await run_in_threadpool(services.list_pauses)


def _pause_request(body: Any) -> dict[str, Any]:
    """The fields of ``POST /ops/pauses`` as ``services.add_pause`` takes them, or
    ``InvalidInput``. ``district`` must be given (null: every district); ``from`` null or
    absent is now; ``until`` is required."""
    if "district" not in body or not (
        body["district"] is None or isinstance(body["district"], str)
    ):
        raise InvalidInput("'district' is required: a district id, or null for every district")
    given: dict[str, Any] = {}
    for key in ("from", "until", "reason"):
        value = body.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"'{key}' is a string, not {type(value).__name__}")
        given[key] = value
    if given["until"] is None:
        raise InvalidInput("'until' is required: when the pause ends, an ISO 8601 date or time")
    return {
        "district_id": body["district"],
        "starts_at": pauses.parse_instant(given["from"], what="'from'") if given["from"] else None,
        "ends_at": pauses.parse_instant(given["until"], what="'until'"),
        "reason": given["reason"],
    }


@router.post("/pauses", status_code=201)
async def ops_add_pause(request: Request, caller: Caller) -> JSONResponse:
    try:
        body = parse_json(await request.body())
    except NotJson as exc:
        return error(400, "invalid_json", f"the body is not JSON: {exc}")
    if not isinstance(body, dict):
        return error(400, "invalid_json", 'send {"district", "from", "until", "reason"}')
    try:
        fields = _pause_request(body)
        by = caller.trigger("ops", "pause-add")
        pause = await run_in_threadpool(lambda: services.add_pause(**fields, by=by))
    except InvalidInput as exc:
        return error(422, "invalid_pause", str(exc))
    return JSONResponse(pause, status_code=201)


@router.delete("/pauses/{pause_id}")
async def ops_remove_pause(pause_id: str, caller: Caller) -> dict[str, Any]:
    """The pause ends now; what it deferred is released and sent at once."""
    if not pause_id.isdigit():
        raise NotFound(f"no pause {pause_id}")
    return await run_in_threadpool(
        services.remove_pause, int(pause_id), by=caller.trigger("ops", "pause-remove")
    )
