"""How the console answers what it refuses: a signed-out visitor goes to the sign-in page, a
refused change is a 403 page, a missing subject a 404 page (the ops API answers JSON)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from worker.console.auth import PageForbidden, SignInFirst
from worker.console.pages import templates


def page(request: Request, status: int, heading: str, message: str) -> Response:
    """A page that says what went wrong, in the console's frame (signed in or not)."""
    return templates.TemplateResponse(
        request,
        "message.html",
        {"me": None, "csrf": "", "flash": None, "heading": heading, "message": message},
        status_code=status,
    )


async def _sign_in_first(request: Request, exc: SignInFirst) -> Response:
    return RedirectResponse("/console/", status_code=303)


async def _page_forbidden(request: Request, exc: PageForbidden) -> Response:
    return page(request, 403, "Forbidden", f"{exc} Nothing was changed.")


def install(app: FastAPI) -> None:
    app.add_exception_handler(SignInFirst, _sign_in_first)  # type: ignore[arg-type]
    app.add_exception_handler(PageForbidden, _page_forbidden)  # type: ignore[arg-type]
