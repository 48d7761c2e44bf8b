"""Structured logs: one JSON object per line on stderr, from every process and library, with the
ids of what is being worked on bound (``structlog.contextvars``: a task binds its ids when it
starts and clears them when it ends, ``worker.tasking``).

Only ids are ever bound or logged (event, account, district, task): never emails or names.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any

import structlog

from worker.settings import get_settings

# Libraries that log every request at INFO.
NOISY = ("uvicorn.access", "httpx", "httpcore")


# Celery logs a task's arguments (as its message's sender wrote them) when it receives and ends
# it. Ours are ids; a message put on the broker by hand may hold anything, an email included.
_QUOTED = re.compile(r"'([^'\\]*)'")
_ID = re.compile(r"[\w.:-]*")
_REST = re.compile(r"(?:[\d\s()\[\]{},.:-]|True|False|None)*")
WITHHELD = "(withheld: not ids)"


def only_ids(text: str) -> str:
    """A task's logged arguments if they are ids and numbers only, else ``WITHHELD``."""
    quoted = _QUOTED.findall(text)
    if all(_ID.fullmatch(q) for q in quoted) and _REST.fullmatch(_QUOTED.sub("", text)):
        return text
    return WITHHELD


def _arguments_as_ids(_: object, __: str, event: Any) -> Any:
    data = event.get("data")
    if isinstance(data, dict) and ("args" in data or "kwargs" in data):
        event["data"] = {
            k: only_ids(str(v)) if k in ("args", "kwargs") else v for k, v in data.items()
        }
    return event


def configure(process: str) -> None:
    """JSON lines on stderr at LOG_LEVEL, for this process and its libraries."""

    def add_process(_: object, __: str, event: structlog.typing.EventDict) -> dict[str, object]:
        return {**event, "process": process}

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.contextvars.merge_contextvars,
            _arguments_as_ids,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.TimeStamper(fmt="iso", key="ts"),
            add_process,
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("msg"),
            structlog.processors.JSONRenderer(default=str),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(get_settings().log_level)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_root_warning() -> None:
    """Celery warns, on every start of a worker run as root, that a root worker accepting pickle
    can be made to run any code. Ours accepts JSON only (``celery_app.check_safe`` refuses to
    start otherwise), so that one warning says nothing here: it alone is silenced, and only for
    root (a container's default user; the image runs as an unprivileged one)."""
    if os.geteuid() != 0:
        return
    from celery.exceptions import SecurityWarning

    warnings.filterwarnings(
        "ignore",
        message="You're running the worker with superuser privileges",
        category=SecurityWarning,
    )


class _NoReplyIsNoError(logging.Filter):
    """Flower asks the workers about themselves when it starts (and when a page refreshes its
    list), and logs "Inspect method … failed" for every question no worker answered within its
    timeout: on every `make run`, where Flower starts beside a worker that is not up yet. That no
    worker answers is what Flower's own pages show; a failure to reach the broker is still logged
    (it carries its exception), as are Flower's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "Inspect method %s failed" and len(record.args or ()) == 1)


def quiet_flower_no_reply() -> None:
    logging.getLogger("flower.inspector").addFilter(_NoReplyIsNoError())
