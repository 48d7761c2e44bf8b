"""Structured logs: one JSON object per line on stderr, from every process and library, with the
ids of what is being worked on bound (``structlog.contextvars``: a task binds its ids when it
starts and clears them when it ends, ``worker.tasking``).

Only ids are ever bound or logged (event, account, district, task): never emails or names.
"""

from __future__ import annotations

import logging
import sys

import structlog

from worker.settings import get_settings

# Libraries that log every request at INFO.
NOISY = ("uvicorn.access", "httpx", "httpcore")


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
