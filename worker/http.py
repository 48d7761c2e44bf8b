"""What the receiver and the ops API share: the error shape, a unit of work off the event loop,
the guard on every request's path, query and body size, and the headers every response carries
(``Hygiene``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tasks.storable import unstorable
from worker.intake import in_session

T = TypeVar("T")


def error(status: int, code: str, message: str) -> JSONResponse:
    """Every error the HTTP side answers: a machine code and a message for people."""
    return JSONResponse({"error": code, "message": message}, status_code=status)


async def db(fn: Callable[[Session], T]) -> T:
    """``fn`` in one transaction, in a worker thread (an unreachable database raises
    ``DatabaseUnavailable``, answered 503)."""
    return await run_in_threadpool(in_session, fn)


# A request body over this is refused with 413, on every route (SPEC §5.2 names the webhook's
# 1 MiB; an ops request's JSON is a few hundred bytes). Fixed, not a setting: senders build their
# events to the contract's limit.
MAX_BODY = 1024 * 1024


class BodyTooLarge(Exception):
    """A request's body went past ``MAX_BODY`` while it was read: answered 413."""

    def __init__(self) -> None:
        super().__init__(f"the body is over 1 MiB ({MAX_BODY} bytes)")


class InputGuard:
    """In front of every route, before any of them runs: a path or query parameter the database
    cannot store (a NUL: ``/ops/events/%00``, ``?status=x%00``) is answered 400 instead of
    failing deep in a query as a 500, and a body is counted as it is read, whatever the headers
    say: past ``MAX_BODY`` the route's read raises ``BodyTooLarge``. A plain ASGI middleware: it
    adds next to nothing to the webhook's path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = _unstorable_target(scope)
        if problem is not None:
            await error(400, "invalid_input", problem)(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            await error(413, "body_too_large", str(BodyTooLarge()))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    raise BodyTooLarge
            return message

        await self.app(scope, counted, send)


def _unstorable_target(scope: Scope) -> str | None:
    """What in the request's path or query the database could not store, named, or None."""
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return unstorable({"path": scope["path"], "query": dict(query)})


async def body_too_large(request: Request, exc: Exception) -> JSONResponse:
    return error(413, "body_too_large", str(exc))


# Every answer of ours: no cache or browser keeps it (the ops API and console show personal data
# and act on a token), and no browser guesses a type other than the one it says.
_HYGIENE = ((b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"))


def _relative(location: bytes, host: bytes) -> bytes:
    """A redirect to this server as a path: never the request's ``Host`` echoed back (a forged
    one would send the client, or a cache that keeps the answer, elsewhere)."""
    target = urlsplit(location.decode("latin-1"))
    if not target.netloc or target.netloc.lower() != host.decode("latin-1").lower():
        return location
    # "//x" alone would mean another host: one slash.
    path = "/" + target.path.lstrip("/")
    return urlunsplit(("", "", path, target.query, target.fragment)).encode("latin-1")


class Hygiene:
    """ASGI middleware over a whole app: the headers above on every response (unless it says its
    own ``Cache-Control``), and redirects to this server relative."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = next((v for k, v in scope["headers"] if k == b"host"), b"")

        async def send_clean(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, _relative(v, host) if k.lower() == b"location" else v)
                    for k, v in message.get("headers", ())
                ]
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in _HYGIENE if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_clean)
