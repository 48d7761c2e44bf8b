"""District exits: ``district preview`` and ``district exit`` (with ``--wait``, ``--in-process``),
and ``district policy``.

The units of work (``tasks.*``) and the operator actions (``worker.services``, which loads the
Celery app) are imported inside the commands: `grassroots --help` and the other commands do
without them, and an exit's end-to-end time includes this command's start-up.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import click
from sqlalchemy.orm import Session

from models import AdminRemoval, District, DistrictStatus, ExitStatus, RequestStatus
from tasks.errors import InvalidInput
from worker.cli.common import emit, fail, refusals, unit_of_work
from worker.settings import get_settings

if TYPE_CHECKING:
    from tasks.exits import ExitProgress

TRIGGER = "cli:district-exit"
# What ``district preview`` prints, in this order, after the accounts by role.
PREVIEW_COUNTS = (
    "classes_removed",
    "enrollments_removed",
    "teacher_links_removed",
    "goals_removed",
    "assignments_removed",
    "report_grants_revoked",
)


@click.group()
def district() -> None:
    """District exits and policy."""


@district.command("preview")
@click.argument("district_id")
@click.option("--json", "as_json", is_flag=True)
def district_preview(district_id: str, as_json: bool) -> None:
    """What an exit of the district would change. Changes nothing."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.view import preview_exit

    with unit_of_work(as_json=as_json) as session:
        preview = preview_exit(session, district_id)
    if as_json:
        emit(preview)
        return
    click.echo(
        f"district {preview['district']} ({preview['status']}), policy "
        f"admin_removal={preview['policy']['admin_removal']}"
    )
    click.echo(f"  accounts converted: {preview['accounts']}")
    for role, c in preview["roles"].items():
        click.echo(
            f"    {role}: {c['accounts']} ({c['converted']} converted, {c['removed']} removed)"
        )
    for key in PREVIEW_COUNTS:
        click.echo(f"  {key.replace('_', ' ')}: {preview[key]}")


# How long ``--wait`` waits at most: a district of 100,000 accounts exits in minutes.
WAIT_TIMEOUT = 3600.0
_WAIT = click.option(
    "--wait", is_flag=True, help="Wait for the exit to finish, with a progress bar."
)
_TIMEOUT = click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=WAIT_TIMEOUT,
    show_default=True,
    help="With --wait: seconds to wait at most, then exit status 1 (the exit goes on).",
)


@district.command("exit")
@click.argument("district_id")
@_WAIT
@_TIMEOUT
@click.option(
    "--in-process",
    is_flag=True,
    help="Run the whole exit here in one transaction, without workers.",
)
def district_exit(district_id: str, wait: bool, timeout: float, in_process: bool) -> None:
    """Exit a district from the program (contract end): convert every account. With --wait,
    ends with status 1 as soon as the exit cannot finish without an operator, or after
    --timeout seconds."""
    if in_process:
        _exit_in_process(district_id)
        return
    # Imported here: the Celery app (worker.services) would slow every command's start.
    from worker import services

    with unit_of_work() as session:
        earlier = _undone_exit(session, district_id)
    with refusals():
        try:
            request_id = services.start_exit(district_id, by=TRIGGER)
        except services.BrokerUnavailable as exc:
            fail(str(exc))
    click.echo(f"district {district_id}: exit started")
    if wait:
        _wait_for_exit(district_id, after=earlier, start=request_id, timeout=timeout)


@district.command("resume")
@click.argument("district_id")
@_WAIT
@_TIMEOUT
def district_resume(district_id: str, wait: bool, timeout: float) -> None:
    """Send the dead and stalled units of a district's exit again, by the same keys."""
    # Imported here: the Celery app (worker.services) would slow every command's start.
    from worker import services

    with refusals():
        try:
            resumed = services.resume_exit(district_id, by="cli:district-resume")
        except services.BrokerUnavailable as exc:
            fail(str(exc))
    dead = ", ".join(resumed.units) or "none dead"
    click.echo(f"district {district_id}: exit {resumed.exit_id} resumed ({dead})")
    if wait:
        _wait_for_exit(district_id, after=None, start=None, timeout=timeout)


def _exit_in_process(district_id: str) -> None:
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.exits import run_in_process

    with unit_of_work() as session:
        out = run_in_process(session, district_id, trigger=TRIGGER)
    click.echo(
        f"district {district_id} exited: "
        + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in out.as_dict().items())
    )


def _undone_exit(session: Session, district_id: str) -> int | None:
    """The exit not to wait for: an active district's latest exit, which a restore has undone.
    An exited district's own exit (under way, or done already) is the one to wait for."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.exits import progress

    district = session.get(District, district_id)
    if district is None or district.status == DistrictStatus.EXITED:
        return None  # no such district: starting its exit says so
    latest = progress(session, district_id)
    return latest.exit_id if latest is not None else None


def _wait_for_exit(
    district_id: str, *, after: int | None, start: str | None, timeout: float
) -> None:
    """Until the district's latest exit, if newer than exit ``after``, is done; status 1 as
    soon as it cannot be without an operator (its start, request ``start``, or a unit is dead,
    or a restore undid it), or after ``timeout`` seconds, naming what it waited for."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.exits import RESTORED, STALLED, progress
    from tasks.operator_requests import status_of

    started = time.monotonic()
    with click.progressbar(length=1, label="exiting", show_pos=True) as bar:
        while True:
            with unit_of_work() as session:
                p = progress(session, district_id)
                begun = p is not None and (after is None or p.exit_id > after)
                asked = status_of(session, start) if start is not None and not begun else None
            if asked == RequestStatus.DEAD:
                fail(
                    f"district {district_id}: the exit's start failed for good: see `grassroots"
                    " status` and its dead letter (`grassroots events list --status dead`), then"
                    " start it again"
                )
            if p is not None and begun:
                bar.length = max(p.units_total, 1)
                bar.update(p.units_done - bar.pos)
                if p.status == ExitStatus.DONE:
                    break
                if p.status == RESTORED:  # undone meanwhile: it will never be done
                    fail(f"district {district_id}: exit {p.exit_id} was undone by a restore")
                if p.status == STALLED:
                    fail(
                        f"district {district_id}: exit {p.exit_id} is stalled: dead unit(s)"
                        f" {', '.join(p.units_dead)}; `grassroots district resume {district_id}`"
                        " sends them again"
                    )
            if time.monotonic() - started >= timeout:
                fail(_gave_up(district_id, p if begun else None, asked, timeout))
            time.sleep(0.5)
    click.echo(f"district {district_id} exited in {time.monotonic() - started:.1f}s")


def _gave_up(district_id: str, p: ExitProgress | None, asked: str | None, timeout: float) -> str:
    """What ``--wait`` waited for when its time ran out; the exit goes on without it."""
    waited = f"district {district_id}: gave up waiting after {timeout:g}s for"
    if p is not None:
        return (
            f"{waited} exit {p.exit_id} to finish ({p.units_done} of {p.units_total} units"
            " done); it goes on: `grassroots status` follows it"
        )
    why = (
        "a worker took it and has not finished starting it"
        if asked == RequestStatus.TAKEN
        else "no worker has taken it: is one running?"
    )
    return f"{waited} the exit to start ({why}); it starts without this command"


@district.command("policy")
@click.argument("district_id")
@click.option(
    "--admin-removal",
    type=click.Choice([str(p) for p in AdminRemoval]),
    help="What becomes of an admin who leaves: a grassroots teacher (convert), or no login.",
)
@click.option(
    "--brake-percent",
    callback=lambda ctx, param, value: _brake_percent(value),
    help="The district's own removal brake, in percent of its accounts a day (above 0, at most"
    " 100), winning over REMOVAL_BRAKE_PERCENT; 'default' follows REMOVAL_BRAKE_PERCENT again.",
)
@click.option("--json", "as_json", is_flag=True)
def policy(
    district_id: str,
    admin_removal: str | None,
    brake_percent: float | Literal["default"] | None,
    as_json: bool,
) -> None:
    """Show or set a district's policy."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.policy import set_policy

    with unit_of_work(as_json=as_json) as session:
        now = set_policy(
            session,
            district_id,
            admin_removal=AdminRemoval(admin_removal) if admin_removal else None,
            brake_percent=brake_percent,
            by="cli:policy",
        )
    if as_json:
        emit({"district": district_id, "policy": now})
        return
    shown = dict(now)
    if shown.get("brake_percent") is None:
        shown["brake_percent"] = (
            f"default (REMOVAL_BRAKE_PERCENT={get_settings().removal_brake_percent:g})"
        )
    click.echo(f"district {district_id}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def _brake_percent(value: str | None) -> float | Literal["default"] | None:
    """``--brake-percent``: a number above 0 and at most 100, or ``default``; else misuse."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.policy import DEFAULT_BRAKE, check_brake_percent

    if value is None:
        return None
    if value == DEFAULT_BRAKE:
        return DEFAULT_BRAKE
    try:
        return check_brake_percent(float(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number (nor 'default')") from None
    except InvalidInput as exc:
        raise click.BadParameter(str(exc)) from None
