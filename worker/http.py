"""What the receiver and the ops API share: the error shape, and a unit of work off the event
loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from worker.intake import in_session

T = TypeVar("T")


def error(status: int, code: str, message: str) -> JSONResponse:
    """Every error the HTTP side answers: a machine code and a message for people."""
    return JSONResponse({"error": code, "message": message}, status_code=status)


async def db(fn: Callable[[Session], T]) -> T:
    """``fn`` in one transaction, in a worker thread (an unreachable database raises
    ``DatabaseUnavailable``, answered 503)."""
    return await run_in_threadpool(in_session, fn)
