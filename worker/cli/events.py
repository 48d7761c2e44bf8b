"""The inbox and what waits for an operator: ``events list|show|replay|discard``, ``held
list|release|discard``, and the pipeline's ``status``.

The views (``tasks.*``) and the operator actions (``worker.services``, ``worker.pipeline``: they
load the Celery app) are imported inside the commands: `grassroots --help` and the other commands
do without them.
"""

from __future__ import annotations

import click

from models import EventStatus
from tasks.errors import NotFound
from worker.cli.common import emit, refusals, show_rows, unit_of_work


@click.group()
def events() -> None:
    """The roster-event inbox and its dead letters."""


@events.command("list")
@click.option("--status", type=click.Choice([str(s) for s in EventStatus]))
@click.option("--type", "type_")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True)
def events_list(status: str | None, type_: str | None, limit: int, as_json: bool) -> None:
    """List events, newest first."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.status import list_events

    with unit_of_work(as_json=as_json) as session:
        rows = list_events(session, status=status, type_=type_, limit=limit)
    show_rows(
        rows,
        lambda r: (
            f"{r['received_at']}  {r['status']:<10} {r['type']:<18} {r['id']}"
            f"  attempts={r['attempts']}" + (f"  {r['error']}" if r["error"] else "")
        ),
        empty=" ".join(["no", *filter(None, [status, type_]), "events"]),
        as_json=as_json,
    )


@events.command("show")
@click.argument("event_id")
def events_show(event_id: str) -> None:
    """Show one event with its dead letters (JSON)."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.status import event_detail

    with unit_of_work(as_json=True) as session:
        detail = event_detail(session, event_id)
        if detail is None:
            raise NotFound(f"no event {event_id}")
    emit(detail)


@events.command("replay")
@click.argument("event_id", required=False)
@click.option(
    "--status",
    type=click.Choice([str(EventStatus.DEAD)]),
    help="Replay every event in this status.",
)
@click.option("--type", "type_", help="With --status: only events of this type.")
@click.option("--district", help="With --status: only events of this district.")
def events_replay(
    event_id: str | None, status: str | None, type_: str | None, district: str | None
) -> None:
    """Run a dead-lettered event again, by the same event id."""
    # Imported here: the Celery app (worker.services) would slow every command's start.
    from tasks import deadletters
    from worker import services

    if (event_id is None) == (status is None):
        raise click.UsageError("give an event id or --status dead")
    if (type_ or district) and not status:
        raise click.UsageError("--type and --district go with --status")
    with refusals():
        if event_id is not None:
            result = services.replay([event_id], by="cli:replay")
        else:
            result = services.replay_dead(type_=type_, district_id=district, by="cli:replay")
    queued = result.replayed
    if event_id is not None and not queued:
        why = {
            deadletters.ALREADY_FINAL: "already applied",
            deadletters.HELD: "held by the brake (grassroots held release)",
            deadletters.DEFERRED: "deferred by a roster pause (applied when it ends)",
            deadletters.IN_FLIGHT: "already queued or being processed",
        }[result.outcomes[event_id]]
        click.echo(f"{event_id}: {why}, nothing to replay")
        return
    if not queued:
        click.echo(
            " ".join(["no dead", *filter(None, [type_]), "events"])
            + (f" in district {district}" if district else "")
            + " to replay"
        )
        return
    unsent = len(queued) - result.sent
    click.echo(
        f"replaying {len(queued)} event(s)" + (f"; {unsent} left for the relay" if unsent else "")
    )


@events.command("discard")
@click.argument("event_id")
def events_discard(event_id: str) -> None:
    """Drop a held or deferred event for good: what it would remove stays."""
    # Imported here: the Celery app (worker.services) would slow every command's start.
    from worker import services

    with refusals():
        was = services.discard_event(event_id, by="cli:discard")
    click.echo(f"{event_id}: discarded (it was {was})")


@click.group()
def held() -> None:
    """Removals held by the brake (REMOVAL_BRAKE_PERCENT)."""


@held.command("list")
@click.option("--district")
@click.option("--json", "as_json", is_flag=True)
def held_list(district: str | None, as_json: bool) -> None:
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.brake import held_events

    with unit_of_work(as_json=as_json) as session:
        rows = [
            {"id": ev.id, "type": ev.type, "account": ev.object_id, "district": ev.district_id}
            for ev in held_events(session, district_id=district)
        ]
    show_rows(
        rows,
        lambda r: f"{r['id']}  {r['type']}  account={r['account']}  district={r['district']}",
        empty="no held removals" + (f" in district {district}" if district else ""),
        as_json=as_json,
        counted="held",
    )


def _one_or_district(event_id: str | None, district: str | None) -> None:
    if (event_id is None) == (district is None):
        raise click.UsageError("give an event id or --district")


@held.command("release")
@click.argument("event_id", required=False)
@click.option("--district")
def held_release(event_id: str | None, district: str | None) -> None:
    """Apply held removals after all."""
    # Imported here: the Celery app (worker.services) would slow every command's start.
    from worker import services

    _one_or_district(event_id, district)
    with refusals():
        ids = services.release_held(event_id=event_id, district_id=district, by="cli:release")
    click.echo(f"released {len(ids)} held removal(s)")


@held.command("discard")
@click.argument("event_id", required=False)
@click.option("--district")
def held_discard(event_id: str | None, district: str | None) -> None:
    """Drop held removals: the accounts stay as they are."""
    # Imported here: the Celery app (worker.services) would slow every command's start.
    from worker import services

    _one_or_district(event_id, district)
    with refusals():
        ids = services.discard_held(event_id=event_id, district_id=district, by="cli:discard")
    click.echo(f"discarded {len(ids)} held removal(s)")


@click.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """Pipeline status: pending work (0 = idle), dead letters, held removals, queue depths."""
    # Imported here: the broker's side (Celery) would slow every command's start.
    from worker.pipeline import pipeline_status

    with unit_of_work(as_json=as_json) as session:
        data = pipeline_status(session)
    if as_json:
        emit(data)
        return
    click.echo(
        f"pending {data['pending']}  dead {data['dead']}  held {data['held']}"
        f"  deferred {data['deferred']}"
        f"  broker {data['broker']}"
    )
    click.echo(
        "queues: "
        + "  ".join(f"{k}={v}" for k, v in data["queues"].items())
        + f"  unacked={data['unacked']}"
    )
