"""The console's routes (SPEC §5.9): each reads one ``tasks.pages`` function and renders its
template, or makes one change through the operator actions and redirects (POST, redirect, GET)
with a one-line message for the next page."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote, unquote, urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from jinja2_fragments.fastapi import Jinja2Blocks

from models import AdminRemoval, utcnow
from tasks import operators, pages, policy
from tasks.conversion import restore
from tasks.errors import GrassrootsError, InvalidInput
from worker import listeners, services
from worker.console import TEMPLATES
from worker.console.auth import (
    COOKIE,
    CSRF_FIELD,
    THROTTLE,
    PageForbidden,
    by,
    changer,
    clear_cookie,
    current,
    reader,
    same_origin,
    set_cookie,
)
from worker.http import db
from worker.pipeline import pipeline_status
from worker.settings import get_settings

FLASH = "grassroots_flash"
FLOWER_PORT = 5555
# The Overview's own refresh, through htmx (its "live" block).
REFRESH_SECONDS = 5

templates = Jinja2Blocks(directory=str(TEMPLATES))
router = APIRouter(prefix="/console")
Reader = Annotated[operators.SignedIn, Depends(reader)]
Changer = Annotated[operators.SignedIn, Depends(changer)]


def render(
    request: Request,
    name: str,
    signed: operators.SignedIn | None,
    *,
    status: int = 200,
    block: str | None = None,
    **context: Any,
) -> Response:
    flash = request.cookies.get(FLASH)
    response = templates.TemplateResponse(
        request,
        name,
        {
            "me": signed.identity if signed else None,
            "csrf": signed.csrf if signed else "",
            "csrf_field": CSRF_FIELD,
            "flash": unquote(flash) if flash else None,
            **context,
        },
        status_code=status,
        block_name=block,
    )
    if flash:
        clear_cookie(request, response, FLASH)
    response.headers["Cache-Control"] = "no-store"
    return response


def done(request: Request, url: str, message: str) -> RedirectResponse:
    """A change made: back to a page (303, so the browser GETs it) with a line saying what."""
    response = RedirectResponse(url, status_code=303)
    set_cookie(request, response, FLASH, quote(message[:300]))
    return response


def _refused(request: Request, url: str, exc: GrassrootsError) -> RedirectResponse:
    return done(request, url, f"Refused: {exc}")


# --------------------------------------------------------------------------------------------
# Sign-in, sign-out, Overview


@router.get("/")
async def overview(request: Request) -> Response:
    signed = await current(request)
    if signed is None:
        return render(request, "sign_in.html", None)
    now = utcnow()

    def read(session: Any) -> dict[str, Any]:
        return {
            **pipeline_status(session, with_finals=False),
            **pages.overview(session, now=now),
        }

    data = await db(read)
    # A local stack's Flower is where `grassroots run` recorded it (any --flower-port); elsewhere
    # it is guessed on this host's default port.
    recorded = listeners.recorded(get_settings().home, listeners.FLOWER)
    flower = (recorded or f"{request.url.scheme}://{request.url.hostname}:{FLOWER_PORT}") + "/"
    block = "live" if request.headers.get("hx-request") else None
    return render(
        request,
        "overview.html",
        signed,
        block=block,
        data=data,
        flower=flower,
        refresh=REFRESH_SECONDS,
    )


@router.post("/sign-in")
async def sign_in(
    request: Request, name: Annotated[str, Form()] = "", token: Annotated[str, Form()] = ""
) -> Response:
    if not same_origin(request):
        raise PageForbidden("this request did not come from the console's own pages")
    client = request.client.host if request.client else "unknown"
    keys = (f"name:{name[:100]}", f"ip:{client}")
    wait = THROTTLE.wait(*keys)
    if wait > 0:
        message = f"Too many failed sign-ins. Try again in {int(wait) + 1} seconds."
        return render(request, "sign_in.html", None, status=429, error=message)
    opened = await db(lambda session: operators.sign_in(session, name, token.strip()))
    if opened is None:
        THROTTLE.failed(*keys)
        return render(request, "sign_in.html", None, status=401, error="Wrong name or token.")
    THROTTLE.succeeded(*keys)
    response = RedirectResponse("/console/", status_code=303)
    set_cookie(request, response, COOKIE, opened.secret)
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    """Ends the session, a viewer's too (the CSRF token is checked, the role is not)."""
    if not same_origin(request):
        raise PageForbidden("this request did not come from the console's own pages")
    signed = await current(request)
    form = await request.form()
    given = form.get(CSRF_FIELD)
    if signed is None or not signed.csrf_matches(given if isinstance(given, str) else None):
        raise PageForbidden("the form's CSRF token is missing or not this session's")
    secret = request.cookies.get(COOKIE, "")
    await db(lambda session: operators.sign_out(session, secret))
    response = RedirectResponse("/console/", status_code=303)
    clear_cookie(request, response, COOKIE)
    return response


# --------------------------------------------------------------------------------------------
# Events


@router.get("/events")
async def events(
    request: Request,
    signed: Reader,
    status: str = "",
    type: str = "",
    district: str = "",
    before: str = "",
) -> Response:
    filters = {"status": status, "type": type, "district": district}
    data = await db(
        lambda session: pages.events(
            session,
            status_=status or None,
            type_=type or None,
            district=district or None,
            before=before or None,
        )
    )
    older = None
    if data["next"]:
        older = "/console/events?" + urlencode({**filters, "before": data["next"]})
    return render(request, "events.html", signed, data=data, filters=filters, older=older)


@router.get("/events/{event_id:path}")
async def event(request: Request, event_id: str, signed: Reader) -> Response:
    data = await db(lambda session: pages.event(session, event_id))
    return render(request, "event.html", signed, ev=data)


@router.post("/events/{event_id:path}/replay")
async def replay(request: Request, event_id: str, signed: Changer) -> Response:
    result = await run_in_threadpool(services.replay, [event_id], by=by(signed, "replay"))
    outcome = result.outcomes[event_id]
    message = "Replayed." if event_id in result.replayed else f"Not replayed: {outcome}."
    return done(request, f"/console/events/{quote(event_id)}", message)


# --------------------------------------------------------------------------------------------
# Dead letters


@router.get("/dead")
async def dead(request: Request, signed: Reader) -> Response:
    data = await db(pages.dead_letters)
    return render(request, "dead.html", signed, data=data)


@router.get("/dead/confirm")
async def dead_confirm(request: Request, signed: Reader, task: str, error: str) -> Response:
    group = await db(lambda session: pages.dead_letter_group(session, task=task, error=error))
    return render(request, "dead_confirm.html", signed, group=group)


@router.post("/dead/replay")
async def dead_replay(
    request: Request,
    signed: Changer,
    task: Annotated[str, Form()],
    error: Annotated[str, Form()],
    up_to: Annotated[int, Form()],
) -> Response:
    result = await run_in_threadpool(
        lambda: services.replay_group(task=task, error=error, up_to=up_to, by=by(signed, "replay"))
    )
    return done(request, "/console/dead", f"Replayed {len(result.replayed)} dead events.")


# --------------------------------------------------------------------------------------------
# Held removals


@router.get("/held")
async def held(request: Request, signed: Reader) -> Response:
    data = await db(pages.held)
    return render(request, "held.html", signed, data=data)


ACTIONS = {"release": "Release", "discard": "Discard"}


@router.get("/held/{district_id}/{action}")
async def held_confirm(request: Request, signed: Reader, district_id: str, action: str) -> Response:
    if action not in ACTIONS:
        return render(request, "not_found.html", signed, status=404, message="No such page.")
    data = await db(lambda session: pages.held_in(session, district_id))
    return render(
        request, "held_confirm.html", signed, data=data, action=action, label=ACTIONS[action]
    )


@router.post("/held/{district_id}/{action}")
async def held_settle(request: Request, signed: Changer, district_id: str, action: str) -> Response:
    """Releases or discards exactly the held events the confirmation named."""
    if action not in ACTIONS:
        return render(request, "not_found.html", signed, status=404, message="No such page.")
    form = await request.form()
    ids = [str(v) for v in form.getlist("event")]
    settle = services.release_held if action == "release" else services.discard_held
    settled = 0
    for event_id in ids:
        try:
            settled += len(
                await run_in_threadpool(
                    lambda e=event_id: settle(event_id=e, by=by(signed, action))  # type: ignore[misc]
                )
            )
        except GrassrootsError:
            continue  # settled meanwhile by someone else: nothing to do for it
    verb = "Released" if action == "release" else "Discarded"
    return done(request, "/console/held", f"{verb} {settled} held removals of {district_id}.")


# --------------------------------------------------------------------------------------------
# Pauses


@router.get("/pauses")
async def pause_list(request: Request, signed: Reader) -> Response:
    now = utcnow()
    data = await db(lambda session: pages.pause_list(session, now=now))
    return render(request, "pauses.html", signed, data=data)


@router.post("/pauses")
async def pause_add(
    request: Request,
    signed: Changer,
    district: Annotated[str, Form()] = "",
    from_: Annotated[str, Form(alias="from")] = "",
    until: Annotated[str, Form()] = "",
    reason: Annotated[str, Form()] = "",
) -> Response:
    from tasks.pauses import parse_instant

    try:
        if not until.strip():
            raise InvalidInput("'Until' is required: when the pause ends")
        starts = parse_instant(from_.strip(), what="'From'") if from_.strip() else None
        ends = parse_instant(until.strip(), what="'Until'")
        added = await run_in_threadpool(
            lambda: services.add_pause(
                district_id=district or None,
                starts_at=starts,
                ends_at=ends,
                reason=reason.strip() or None,
                by=by(signed, "pause-add"),
            )
        )
    except GrassrootsError as exc:
        return _refused(request, "/console/pauses", exc)
    return done(request, "/console/pauses", f"Added pause {added['id']}.")


@router.post("/pauses/{pause_id}/remove")
async def pause_remove(request: Request, signed: Changer, pause_id: int) -> Response:
    try:
        removed = await run_in_threadpool(
            services.remove_pause, pause_id, by=by(signed, "pause-remove")
        )
    except GrassrootsError as exc:
        return _refused(request, "/console/pauses", exc)
    return done(
        request,
        "/console/pauses",
        f"Removed pause {pause_id}; {removed['released']} deferred events released.",
    )


# --------------------------------------------------------------------------------------------
# District


def _district_url(district_id: str) -> str:
    return f"/console/districts/{quote(district_id)}"


@router.get("/districts/{district_id}")
async def district(request: Request, signed: Reader, district_id: str) -> Response:
    data = await db(lambda session: pages.district(session, district_id))
    return render(request, "district.html", signed, d=data, policies=[str(p) for p in AdminRemoval])


@router.post("/districts/{district_id}/policy")
async def district_policy(
    request: Request,
    signed: Changer,
    district_id: str,
    admin_removal: Annotated[str, Form()] = "",
    brake_percent: Annotated[str, Form()] = "",
) -> Response:
    try:
        brake: float | str | None = None
        if brake_percent.strip() == policy.DEFAULT_BRAKE or brake_percent.strip() == "":
            brake = policy.DEFAULT_BRAKE
        else:
            try:
                brake = float(brake_percent)
            except ValueError:
                raise InvalidInput(f"{brake_percent!r} is not a percentage") from None
        removal = AdminRemoval(admin_removal) if admin_removal else None
        await db(
            lambda session: policy.set_policy(
                session,
                district_id,
                admin_removal=removal,
                brake_percent=brake,  # type: ignore[arg-type]
                by=by(signed, "policy"),
            )
        )
    except (GrassrootsError, ValueError) as exc:
        return done(request, _district_url(district_id), f"Refused: {exc}")
    return done(request, _district_url(district_id), "Policy saved.")


@router.get("/districts/{district_id}/exit")
async def exit_confirm(request: Request, signed: Reader, district_id: str) -> Response:
    data = await db(lambda session: pages.district(session, district_id))
    return render(request, "exit_confirm.html", signed, d=data)


@router.post("/districts/{district_id}/exit")
async def exit_start(request: Request, signed: Changer, district_id: str) -> Response:
    try:
        await run_in_threadpool(services.start_exit, district_id, by=by(signed, "district-exit"))
    except services.BrokerUnavailable as exc:
        return done(request, _district_url(district_id), f"Not started: {exc}")
    return done(request, _district_url(district_id), "Exit started.")


@router.post("/districts/{district_id}/resume")
async def exit_resume(request: Request, signed: Changer, district_id: str) -> Response:
    try:
        resumed = await run_in_threadpool(
            services.resume_exit, district_id, by=by(signed, "district-resume")
        )
    except services.BrokerUnavailable as exc:
        return done(request, _district_url(district_id), str(exc))
    except GrassrootsError as exc:
        return _refused(request, _district_url(district_id), exc)
    return done(
        request, _district_url(district_id), f"Resumed: {len(resumed.units)} units sent again."
    )


# --------------------------------------------------------------------------------------------
# Account, Audit


@router.get("/accounts")
async def find_account(request: Request, signed: Reader, id: str = "") -> Response:
    return RedirectResponse(f"/console/accounts/{quote(id.strip())}", status_code=303)


@router.get("/accounts/{account_id}")
async def account(request: Request, signed: Reader, account_id: str) -> Response:
    days, now = get_settings().retention_days, utcnow()
    data = await db(
        lambda session: pages.account(session, account_id, retention_days=days, now=now)
    )
    return render(request, "account.html", signed, a=data["view"], restorable=data["restorable"])


@router.post("/accounts/{account_id}/restore")
async def account_restore(request: Request, signed: Changer, account_id: str) -> Response:
    url = f"/console/accounts/{quote(account_id)}"
    days = get_settings().retention_days
    try:
        result = await db(
            lambda session: restore(
                session, account_id, trigger=by(signed, "restore"), retention_days=days
            )
        )
    except GrassrootsError as exc:
        return _refused(request, url, exc)
    if result.entries == 0:
        return done(request, url, "Nothing to restore.")
    return done(request, url, f"Restored: {result.links_restored} links.")


@router.get("/audit")
async def audit(request: Request, signed: Reader, before: int | None = None) -> Response:
    data = await db(lambda session: pages.audit(session, before=before))
    older = f"/console/audit?before={data['next']}" if data["next"] else None
    return render(request, "audit.html", signed, data=data, older=older)
