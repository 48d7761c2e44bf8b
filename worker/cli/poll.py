"""``grassroots poll``: pull each district's Clever Events API feed into the inbox (SPEC §5.3).

The poller (``worker.poller``: httpx, and the Celery app it sends through) and the structured logs
(structlog) are imported inside the command: `grassroots --help` and the other commands do without
them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import click
from sqlalchemy.exc import SQLAlchemyError

from worker.cli.common import district_tokens, fail
from worker.db import require_stack, session_scope
from worker.settings import ConfigError, Settings, get_settings

if TYPE_CHECKING:
    from worker.poller import PollResult


def _configure_logging(settings: Settings, *, forever: bool) -> None:
    # Imported here: structlog would slow every command's start.
    from worker import logs

    if logging.getLogger().handlers:
        return  # somebody (a test, a process embedding the command) already decided
    logs.configure("poll")
    if not forever and "log_level" not in settings.model_fields_set:
        # One pass prints its own summary per district: its INFO lines would say it twice.
        logging.getLogger().setLevel(logging.WARNING)


def _line(result: PollResult) -> str:
    counts = f"{result.pages} page(s), {result.events} event(s), {result.new} new"
    if result.ok:
        return f"district {result.district_id}: {result.outcome}, {counts}; cursor {result.cursor}"
    return f"district {result.district_id}: {result.outcome} ({result.error}), {counts}"


def _report(results: Sequence[PollResult], *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results]))
        return
    for result in results:
        click.echo(_line(result))


@click.command("poll")
@click.option("--forever", is_flag=True, help="Keep polling, one pass every --interval seconds.")
@click.option(
    "--interval",
    type=click.FloatRange(min=1.0),
    default=None,
    help="Seconds between passes with --forever [default: POLL_INTERVAL, 60].",
)
@click.option(
    "--from-start",
    is_flag=True,
    help="Replay each district's whole 30-day window (events already stored are skipped by id).",
)
@click.option(
    "--district",
    "districts",
    multiple=True,
    metavar="ID",
    help="Only this district (repeatable; default: every district in CLEVER_DISTRICT_TOKENS).",
)
@click.option(
    "--reset",
    is_flag=True,
    help="Poll a disconnected or resync_needed district again, from its newest event on.",
)
@click.option(
    "--page-size",
    type=click.IntRange(1, 10000),
    default=None,
    help="Events per request (default 1000; Clever allows up to 10000).",
)
@click.option("--json", "as_json", is_flag=True, help="Print each pass as a JSON array.")
def poll(
    forever: bool,
    interval: float | None,
    from_start: bool,
    districts: tuple[str, ...],
    reset: bool,
    page_size: int | None,
    as_json: bool,
) -> None:
    """Pull the Clever Events API of every district token into the inbox.

    A district's first pass starts at its newest event (history is not replayed unless
    --from-start asks). Exit status 1 when a district needs attention.
    """
    # Imported here: the Clever client (httpx) would slow every command's start.
    from worker.clever import parse_tokens
    from worker.poller import PollOptions, poll_all, reset_district

    try:
        settings = get_settings()
        _configure_logging(settings, forever=forever)
        tokens = district_tokens(
            parse_tokens(settings.clever_district_tokens), districts, doing="poll"
        )
        # Here, once: each district's pass would otherwise fail on its own with NoStack.
        require_stack(settings)
    except ConfigError as exc:
        fail(str(exc))
    options = PollOptions.from_settings(settings)
    if page_size is not None:
        options = replace(options, page_size=page_size)
    try:
        if reset:
            for token in tokens:
                reset_district(session_scope, token.district_id)
        while True:
            # Each district's failure is caught (and logged) inside: one never stops the others.
            results = poll_all(session_scope, tokens, options=options, from_start=from_start)
            _report(results, as_json=as_json)
            if not forever:
                break
            from_start = False  # the window is replayed once, then the feed is followed
            time.sleep(interval or settings.poll_interval)
    except SQLAlchemyError as exc:
        fail(f"database unavailable: {type(exc).__name__}")
    troubled = [r for r in results if not r.ok]
    if troubled:
        names = ", ".join(f"{r.district_id} ({r.outcome})" for r in troubled)
        fail(f"{len(troubled)} of {len(results)} district(s) need attention: {names}")
