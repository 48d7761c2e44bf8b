"""Who is signed in to the console, and whether a ``POST`` may change anything (SPEC §5.9).

The session is a random secret in a cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` over
HTTPS); every ``POST`` must carry the session's CSRF token and come from this site's own pages
(its ``Origin``, or else its ``Referer``, names this host), and a viewer's ``POST`` is refused.
The rules (sessions, idle expiry, the slowing of failed sign-ins) are ``tasks.operators``'.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import Response

from tasks import operators
from worker.http import db

COOKIE = "grassroots_console"
PATH = "/console"
CSRF_FIELD = "csrf"
# Failed sign-ins of this process (per name and per address): bounded, see ``Throttle``.
THROTTLE = operators.Throttle()


class SignInFirst(Exception):
    """A signed-out visitor asked for a page: sent to the sign-in page."""


class PageForbidden(Exception):
    """Answered 403 with a page: a change refused (a viewer, no or a wrong CSRF token, another
    site), nothing changed."""


def set_cookie(request: Request, response: Response, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(request: Request, response: Response, name: str) -> None:
    response.delete_cookie(
        name, path=PATH, httponly=True, samesite="strict", secure=request.url.scheme == "https"
    )


async def current(request: Request) -> operators.SignedIn | None:
    secret = request.cookies.get(COOKIE)
    if not secret:
        return None
    # The Overview refreshing itself (htmx) is not the operator's activity: an open tab alone
    # does not keep a session from its idle end.
    active = not request.headers.get("hx-request")
    return await db(lambda session: operators.signed_in(session, secret, active=active))


async def reader(request: Request) -> operators.SignedIn:
    """A page's dependency: the signed-in operator, or off to the sign-in page."""
    found = await current(request)
    if found is None:
        raise SignInFirst
    return found


def same_origin(request: Request) -> bool:
    """The request came from a page of this site: its ``Origin`` (or, without one, its
    ``Referer``) names this scheme and host. A request with neither (not a browser's) is left
    to the CSRF token."""
    own = f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == own
    referer = request.headers.get("referer")
    if referer is not None:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}" == own
    return True


async def changer(request: Request) -> operators.SignedIn:
    """A ``POST``'s dependency: an operator (not a viewer), from this site, with the session's
    CSRF token; anything else is 403 and changes nothing."""
    if not same_origin(request):
        raise PageForbidden("this request did not come from the console's own pages")
    found = await current(request)
    if found is None:
        raise PageForbidden("sign in first")
    form = await request.form()
    given = form.get(CSRF_FIELD)
    if not found.csrf_matches(given if isinstance(given, str) else None):
        raise PageForbidden("the form's CSRF token is missing or not this session's")
    if not found.identity.may_change:
        raise PageForbidden("you are a viewer: you may look, not change")
    return found


def by(signed: operators.SignedIn, action: str) -> str:
    """The audit trigger of a change made in the console."""
    return signed.identity.trigger("console", action)
