"""Roster pauses (SPEC §4 "Pauses"): ``pause add``, ``pause list``, ``pause remove``.

The operator actions (``worker.services``, which loads the Celery app) and the rule
(``tasks.pauses``) are imported inside the commands: `grassroots --help` and the other commands
do without them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from tasks.errors import InvalidInput
from worker.cli.common import emit, refusals, show_rows


class Instant(click.ParamType[datetime, Any]):
    """An ISO 8601 date or time, in UTC: a date is its midnight UTC, a time without an offset
    is UTC. Anything else is misuse (status 2)."""

    name = "instant"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        # Imported here: each command loads only the work it runs (CLI start-up).
        from tasks.pauses import parse_instant

        if isinstance(value, datetime):
            return value
        what = param.opts[0] if param is not None and param.opts else "instant"
        try:
            return parse_instant(str(value), what=what)
        except InvalidInput as exc:
            self.fail(str(exc), param, ctx)


INSTANT = Instant()


@click.group()
def pause() -> None:
    """Roster pauses: while one covers a district, its roster removals wait for its end."""


@pause.command("add")
@click.option("--district", help="The district to pause (default: every district).")
@click.option("--from", "from_", type=INSTANT, help="When it starts (default: now).")
@click.option("--until", required=True, type=INSTANT, help="When it ends.")
@click.option("--reason", help="Why, for the operators and the deferred events' reason.")
@click.option("--json", "as_json", is_flag=True)
def pause_add(
    district: str | None,
    from_: datetime | None,
    until: datetime,
    reason: str | None,
    as_json: bool,
) -> None:
    """Pause roster removals of a district, or every district, from --from to --until (ISO 8601,
    UTC; a date means its midnight): they are deferred, and applied when the pause ends."""
    # Imported here: the Celery app (worker.services) would slow every command's start.
    from worker import services

    with refusals(as_json=as_json):
        try:
            made = services.add_pause(
                district_id=district,
                starts_at=from_,
                ends_at=until,
                reason=reason,
                by="cli:pause-add",
            )
        except InvalidInput as exc:
            # The values given on the command line do not make a pause: misuse, status 2.
            raise click.UsageError(str(exc)) from exc
    if as_json:
        emit(made)
        return
    click.echo(f"pause {made['id']} added: {_line(made)}")


@pause.command("list")
@click.option("--json", "as_json", is_flag=True)
def pause_list(as_json: bool) -> None:
    """The pauses to come, running, or ended with deferred events not yet released."""
    # Imported here: the Celery app (worker.services) would slow every command's start.
    from worker import services

    with refusals(as_json=as_json):
        rows = services.list_pauses()
    show_rows(
        rows,
        lambda row: f"{row['id']:>4}  {_line(row)}  deferred={row['deferred']}",
        empty="no pauses",
        as_json=as_json,
        counted="pause(s)",
    )


@pause.command("remove")
@click.argument("pause_id", type=int)
def pause_remove(pause_id: int) -> None:
    """End a pause now: what it deferred is applied at once, in Clever order."""
    # Imported here: the Celery app (worker.services) would slow every command's start.
    from worker import services

    with refusals():
        removed = services.remove_pause(pause_id, by="cli:pause-remove")
    click.echo(
        f"pause {pause_id} removed; {removed['released']} deferred event(s) released to the workers"
    )


def _line(row: dict[str, Any]) -> str:
    scope = f"district {row['district']}" if row["district"] else "every district"
    why = f"  ({row['reason']})" if row["reason"] else ""
    return f"{scope} from {row['from']} until {row['until']}{why}"
