"""``grassroots``: the command line (SPEC §5.6). Exit 0 on success, 1 on an error (one line on
stderr), 2 on misuse."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from models import EventStatus
from worker.cli_poll import poll as poll_command
from worker.db import NoStack, refresh_statistics, require_stack, session_scope
from worker.settings import ConfigError, get_settings, home_secrets

F = TypeVar("F", bound=Callable[..., Any])


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_LEVEL_OPTION = click.option(
    "--loglevel",
    "-l",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
)


def fail(message: str, *, code: str | None = None) -> NoReturn:
    """End the command: one line on stderr, status 1. With ``code`` (the error of a command asked
    for --json), the ops API's error object on stdout as well, for a script that reads stdout."""
    if code is not None:
        click.echo(json.dumps({"error": code, "message": message}))
    click.echo(f"grassroots: {message}", err=True)
    sys.exit(1)


@contextmanager
def unit_of_work(*, as_json: bool = False) -> Iterator[Session]:
    """A session scope whose failures end the command with a one-line message (and, for
    ``as_json``, a JSON error object)."""
    from tasks.errors import GrassrootsError, NotFound

    def end(code: str, message: str) -> NoReturn:
        fail(message, code=code if as_json else None)

    try:
        with session_scope() as session:
            yield session
    except NotFound as exc:
        end("not_found", str(exc))
    except GrassrootsError as exc:
        end("refused", str(exc))
    except OperationalError as exc:
        end(
            "database_unavailable",
            f"database unavailable: {exc.orig.__class__.__name__}: {str(exc.orig).strip()}",
        )
    except SQLAlchemyError as exc:
        end("database_error", f"database error: {exc.__class__.__name__}")
    except NoStack as exc:
        end("no_stack", str(exc))
    except ConfigError as exc:
        end("not_configured", str(exc))


def emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        # A setting we cannot use, or no stack where a command looks for its database (NoStack,
        # raised where the engine is made), is one line and status 1 in every command.
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            fail(str(exc))


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    help="The stack's directory, where `grassroots run` keeps its database, generated secrets,"
    " schedule and private redis (overrides GRASSROOTS_HOME; default ./var).",
)
def main(home: Path | None) -> None:
    """grassroots: converts district accounts to grassroots accounts when they leave the
    district program."""
    if home is not None:
        os.environ["GRASSROOTS_HOME"] = str(home)
    get_settings.cache_clear()
    try:
        # The secrets `grassroots run` generated under the home stand in for the variables left
        # unset, for this command and any process it starts.
        os.environ.update(home_secrets(get_settings().home, os.environ))
        get_settings.cache_clear()
        get_settings()
    except ConfigError as exc:
        fail(str(exc))


# --- database --------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations (the only way the schema is made)."""
    from worker.migrate import upgrade

    try:
        upgrade(get_settings().database_url, revision)
    except OperationalError as exc:
        fail(f"database unavailable: {str(exc.orig).strip()}")
    click.echo("database is at the latest schema")


# --- roster ----------------------------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def seed(file: Path) -> None:
    """Load a roster snapshot (SPEC §5.1). Idempotent; a malformed file is refused whole."""
    from tasks.roster import SnapshotError, load_snapshot

    try:
        data = json.loads(file.read_bytes())
    except FileNotFoundError:
        fail(f"{file}: no such file")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{file}: cannot read: {exc}")
    except json.JSONDecodeError as exc:
        fail(f"{file}: not JSON: {exc}")
    with unit_of_work() as session:
        try:
            result = load_snapshot(session, data)
        except SnapshotError as exc:
            fail(f"{file}: {exc}; nothing was loaded")
    with unit_of_work() as session:
        refresh_statistics(session)
    counts = ", ".join(f"{v} {k}" for k, v in result.as_dict().items())
    if any(result.left_out.values()):
        counts += "; left out, their district having exited: " + ", ".join(
            f"{v} {k}" for k, v in result.left_out.items()
        )
    click.echo(f"seeded {file}: {counts}")


# --- accounts --------------------------------------------------------------------------------


@main.group()
def account() -> None:
    """Look at accounts."""


@account.command("show")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="Print the SPEC §5.4 JSON view.")
def account_show(account_id: str, as_json: bool) -> None:
    """Show an account by its Clever id or platform id."""
    from tasks.view import account_view

    with unit_of_work(as_json=as_json) as session:
        view = account_view(session, account_id)
    if as_json:
        emit(view)
        return
    click.echo(f"{view['id']}  {view['kind']}  {view['status']}  roles={','.join(view['roles'])}")
    click.echo(
        f"  district: {view['district'] or '-'}  district reports: {view['district_reports']}"
    )
    for c in view["classes"]:
        click.echo(f"  class {c['id']}  {'district' if c['district_synced'] else 'independent'}")
    for key in ("goals", "assignments"):
        for item in view[key]:
            click.echo(f"  {key[:-1]} {item['id']} (class {item['class']})")
    click.echo(f"  coaches: {', '.join(view['coaches']) or '-'}")
    click.echo(f"  students: {', '.join(view['students']) or '-'}")
    click.echo(f"  progress: {len(view['progress'])} skills")


# --- districts -------------------------------------------------------------------------------


@main.group()
def district() -> None:
    """District exits."""


@district.command("preview")
@click.argument("district_id")
@click.option("--json", "as_json", is_flag=True)
def district_preview(district_id: str, as_json: bool) -> None:
    """What an exit of the district would change. Changes nothing."""
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
    for key in (
        "classes_removed",
        "enrollments_removed",
        "teacher_links_removed",
        "goals_removed",
        "assignments_removed",
        "report_grants_revoked",
    ):
        click.echo(f"  {key.replace('_', ' ')}: {preview[key]}")


@district.command("exit")
@click.argument("district_id")
@click.option("--wait", is_flag=True, help="Wait for the exit to finish, with a progress bar.")
@click.option(
    "--in-process",
    is_flag=True,
    help="Run the whole exit here in one transaction, without workers.",
)
def district_exit(district_id: str, wait: bool, in_process: bool) -> None:
    """Exit a district from the program (contract end): convert every account."""
    if in_process:
        from tasks.conversion import run_district_exit

        with unit_of_work() as session:
            out = run_district_exit(session, district_id, trigger="cli:district-exit")
        click.echo(
            f"district {district_id} exited: "
            + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in out.as_dict().items())
        )
        return
    from models import District
    from tasks.errors import NotFound
    from tasks.exits import progress
    from worker.celery_app import app

    with unit_of_work() as session:
        district = session.get(District, district_id)
        if district is None:
            raise NotFound(f"no district {district_id}")
        # What to wait for: an exited district's own exit (under way, or done already), or else a
        # new one; not an earlier exit that a restore has since undone.
        latest = progress(session, district_id)
        earlier = latest.exit_id if latest is not None and district.status != "exited" else None
    try:
        # By name: importing the tasks (and the engine behind them) would double the command's
        # start-up time, which an exit's end-to-end time includes.
        app.send_task("grassroots.district_exit", (district_id, "cli:district-exit"))
    except Exception as exc:
        fail(f"broker unavailable ({type(exc).__name__}): the exit was not started")
    click.echo(f"district {district_id}: exit started")
    if wait:
        _wait_for_exit(district_id, after=earlier)


def _wait_for_exit(district_id: str, *, after: int | None) -> None:
    """Until the district's latest exit, if newer than exit ``after``, is done."""
    import time

    from tasks.exits import progress

    started = time.monotonic()
    with click.progressbar(length=1, label="exiting", show_pos=True) as bar:
        while True:
            with unit_of_work() as session:
                p = progress(session, district_id)
            if p is not None and (after is None or p.exit_id > after):
                bar.length = max(p.total, 1)
                bar.update(p.done - bar.pos)
                if p.status == "done":
                    break
                if p.status == "restored":  # undone meanwhile: it will never be done
                    fail(f"district {district_id}: exit {p.exit_id} was undone by a restore")
            time.sleep(0.5)
    click.echo(f"district {district_id} exited in {time.monotonic() - started:.1f}s")


# --- restore ---------------------------------------------------------------------------------


@main.command()
@click.argument("subject_id")
def restore(subject_id: str) -> None:
    """Bring back an account or a district converted within the retention window."""
    from tasks.conversion import restore as restore_subject

    settings = get_settings()
    with unit_of_work() as session:
        result = restore_subject(
            session, subject_id, trigger="cli:restore", retention_days=settings.retention_days
        )
    if result.entries == 0:
        click.echo(f"{subject_id}: nothing to restore")
    else:
        click.echo(
            f"restored {subject_id}: {result.entries} journal entries, "
            f"{result.links_restored} links, {len(result.accounts)} accounts"
        )


@main.command()
def purge() -> None:
    """Hard-delete what conversions removed more than RETENTION_DAYS ago."""
    from tasks.conversion import purge as purge_expired

    with unit_of_work() as session:
        n = purge_expired(session, retention_days=get_settings().retention_days)
    click.echo(f"purged {n} journal entries")


# --- processes -------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="uvicorn worker processes.",
)
def serve(host: str, port: int, workers: int) -> None:
    """Run the webhook receiver and ops API."""
    import uvicorn

    from worker.logs import configure

    configure("serve")
    # Keep idle connections longer than a client or load balancer does (60 s is common), so the
    # server never closes one just as a request is sent on it (a reset the sender sees as lost).
    uvicorn.run(
        "worker.api:app",
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_config=None,
        timeout_keep_alive=75,
    )


@main.command()
@click.option(
    "--concurrency",
    "-c",
    default=None,
    type=click.IntRange(1, 256),
    help="Worker processes (default: one per core).",
)
@click.option(
    "--queues",
    "-Q",
    default=",".join(("events", "conversions", "fanout", "maintenance")),
    show_default=True,
)
@click.option(
    "--hostname",
    "-n",
    default=None,
    help="Node name, as Celery's (%h expands to the host) [default: grassroots-<pid>@<host>].",
)
@LOG_LEVEL_OPTION
def worker(concurrency: int | None, queues: str, hostname: str | None, loglevel: str) -> None:
    """Run a Celery worker. Start more on more machines to scale out."""
    from celery.utils.log import mlevel
    from celery.utils.nodenames import default_nodename, host_format

    from worker.celery_app import QUEUES, UnsafeConfiguration, app, check_safe

    # With no stack here, refused now rather than in every task (the receiver starts anyway:
    # its /healthz needs no database).
    require_stack()
    try:
        check_safe(app.conf, get_settings())
    except UnsafeConfiguration as exc:
        fail(str(exc))
    names = [name.strip() for name in queues.split(",") if name.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        fail(f"--queues takes some of {', '.join(QUEUES)}; got {queues!r}")
    # Started as ``celery worker`` would start it, without going through Celery's command line:
    # that imports every Celery subcommand and plugin (Flower's among them, with Tornado and
    # prometheus_client), about 12 MB that the worker and each of its pool children would hold.
    instance = app.Worker(
        # Celery's default, celery@<host>, is the same for every worker on a machine: their
        # control replies and heartbeats would be taken for one worker's.
        hostname=host_format(default_nodename(hostname or f"grassroots-{os.getpid()}@%h")),
        loglevel=mlevel(loglevel.upper()),
        queues=names,
        concurrency=concurrency,
        optimization="default",
    )
    instance.start()
    sys.exit(instance.exitcode)


@main.command()
@LOG_LEVEL_OPTION
def beat(loglevel: str) -> None:
    """Run the scheduler (relay of undelivered events, purge, poll)."""
    from worker.celery_app import app

    get_settings().home.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "-l", loglevel, "-s", str(get_settings().home / "celerybeat-schedule")])


# --- events ----------------------------------------------------------------------------------


@main.group()
def events() -> None:
    """The roster-event inbox and its dead letters."""


@events.command("list")
@click.option("--status", type=click.Choice([str(s) for s in EventStatus]))
@click.option("--type", "type_")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100000))
@click.option("--json", "as_json", is_flag=True)
def events_list(status: str | None, type_: str | None, limit: int, as_json: bool) -> None:
    """List events, newest first."""
    from worker.ops import event_row, list_events

    with unit_of_work(as_json=as_json) as session:
        rows = [
            event_row(ev) for ev in list_events(session, status=status, type_=type_, limit=limit)
        ]
    if as_json:
        emit(rows)
        return
    for r in rows:
        click.echo(
            f"{r['received_at']}  {r['status']:<10} {r['type']:<18} {r['id']}"
            f"  attempts={r['attempts']}" + (f"  {r['error']}" if r["error"] else "")
        )


@events.command("show")
@click.argument("event_id")
def events_show(event_id: str) -> None:
    """Show one event with its dead letters (JSON)."""
    from sqlalchemy import select

    from models import RosterEvent
    from tasks.errors import NotFound
    from worker.ops import event_detail

    with unit_of_work(as_json=True) as session:
        ev = session.scalar(select(RosterEvent).where(RosterEvent.id == event_id))
        if ev is None:
            raise NotFound(f"no event {event_id}")
        emit(event_detail(session, ev))


NOT_REPLAYED = {
    "already_final": "already applied",
    "held": "held by the brake (grassroots held release)",
    "in_flight": "already queued or being processed",
}


@events.command("replay")
@click.argument("event_id", required=False)
@click.option("--status", type=click.Choice(["dead"]), help="Replay every event in this status.")
@click.option("--type", "type_", help="With --status: only events of this type.")
def events_replay(event_id: str | None, status: str | None, type_: str | None) -> None:
    """Run a dead-lettered event again, by the same event id."""
    from sqlalchemy import select

    from models import RosterEvent
    from tasks.events import REPLAYED, mark_replay
    from tasks.jobs import enqueue_events

    if (event_id is None) == (status is None):
        raise click.UsageError("give an event id or --status dead")
    if type_ and not status:
        raise click.UsageError("--type goes with --status")
    with unit_of_work() as session:
        if event_id is not None:
            ids = [event_id]
        else:
            query = select(RosterEvent.id).where(RosterEvent.status == status)
            if type_:
                query = query.where(RosterEvent.type == type_)
            ids = list(session.scalars(query.order_by(RosterEvent.received_at)))
        outcomes = {i: mark_replay(session, i, by="cli:replay") for i in ids}
    queued = [i for i, outcome in outcomes.items() if outcome == REPLAYED]
    sent = enqueue_events(queued)
    if event_id is not None and not queued:
        click.echo(f"{event_id}: {NOT_REPLAYED[outcomes[event_id]]}, nothing to replay")
        return
    click.echo(
        f"replaying {len(queued)} event(s)"
        + ("" if sent == len(queued) else f"; {len(queued) - sent} left for the relay")
    )


# --- held removals ---------------------------------------------------------------------------


@main.group()
def held() -> None:
    """Removals held by the brake (REMOVAL_BRAKE_PERCENT)."""


@held.command("list")
@click.option("--district")
@click.option("--json", "as_json", is_flag=True)
def held_list(district: str | None, as_json: bool) -> None:
    from tasks.events import held_events

    with unit_of_work(as_json=as_json) as session:
        rows = [
            {"id": ev.id, "type": ev.type, "account": ev.object_id, "district": ev.district_id}
            for ev in held_events(session, district_id=district)
        ]
    if as_json:
        emit(rows)
        return
    for r in rows:
        click.echo(f"{r['id']}  {r['type']}  account={r['account']}  district={r['district']}")
    click.echo(f"{len(rows)} held")


def _held_targets(event_id: str | None, district: str | None) -> None:
    if (event_id is None) == (district is None):
        raise click.UsageError("give an event id or --district")


@held.command("release")
@click.argument("event_id", required=False)
@click.option("--district")
def held_release(event_id: str | None, district: str | None) -> None:
    """Apply held removals after all."""
    from tasks.events import release_held
    from tasks.jobs import enqueue_events

    _held_targets(event_id, district)
    with unit_of_work() as session:
        ids = release_held(session, event_id=event_id, district_id=district, by="cli:release")
    enqueue_events(ids)
    click.echo(f"released {len(ids)} held removal(s)")


@held.command("discard")
@click.argument("event_id", required=False)
@click.option("--district")
def held_discard(event_id: str | None, district: str | None) -> None:
    """Drop held removals: the accounts stay as they are."""
    from tasks.events import discard_held

    _held_targets(event_id, district)
    with unit_of_work() as session:
        ids = discard_held(session, event_id=event_id, district_id=district, by="cli:discard")
    click.echo(f"discarded {len(ids)} held removal(s)")


# --- status and tools ------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True)
def status(as_json: bool) -> None:
    """Pipeline status: pending work (0 = idle), dead letters, held removals, queue depths."""
    from worker.ops import pipeline_status

    with unit_of_work(as_json=as_json) as session:
        data = pipeline_status(session)
    if as_json:
        emit(data)
        return
    click.echo(
        f"pending {data['pending']}  dead {data['dead']}  held {data['held']}"
        f"  broker {data['broker']}"
    )
    click.echo(
        "queues: "
        + "  ".join(f"{k}={v}" for k, v in data["queues"].items())
        + f"  unacked={data['unacked']}"
    )


@main.command("send-webhook")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--url", default="http://127.0.0.1:8000/webhooks/clever", show_default=True)
def send_webhook(file: Path, url: str) -> None:
    """Sign an event file with the first WEBHOOK_SECRETS secret (or the stack's) and POST it."""
    import httpx

    from worker.demo import webhook_secret
    from worker.signing import signed_headers

    secret = webhook_secret()
    try:
        body = file.read_bytes()
    except OSError as exc:
        fail(f"{file}: cannot read: {exc.strerror}")
    headers = {"content-type": "application/json", **signed_headers(secret, body)}
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        fail(f"{url}: {type(exc).__name__}: {exc}")
    click.echo(f"{response.status_code} {response.text}")
    if response.status_code >= 300:
        sys.exit(1)


@main.command()
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", default=5555, show_default=True, type=click.IntRange(1, 65535))
def flower(address: str, port: int) -> None:
    """Run Flower (queue depth per queue, workers, tasks). FLOWER_BASIC_AUTH (user:password) is
    required unless it listens on loopback only."""
    auth = get_settings().flower_basic_auth
    loopback = address in ("127.0.0.1", "localhost", "::1")
    if not auth and not loopback:
        fail(
            f"refusing to serve Flower on {address or 'every interface'} without"
            " FLOWER_BASIC_AUTH (user:password)"
        )
    if auth and not all(
        user and password for user, _, password in (c.partition(":") for c in auth.split(","))
    ):
        fail("FLOWER_BASIC_AUTH must be user:password, neither empty (several: comma-separated)")
    from worker.celery_app import app

    # With the Redis broker Flower reads each named queue's depth from Redis itself, choosing its
    # reader by the scheme of the broker URL kombu gives back: it needs kombu's own transport
    # for that (``worker.broker`` only serves the worker's message handling).
    app.conf.broker_transport = None
    argv = ["flower", f"--address={address}", f"--port={port}", "--purge_offline_workers=60"]
    if auth:
        argv.append(f"--basic-auth={auth}")
    else:
        # Loopback only, no auth configured: the UI is open to this machine, so is its API.
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
    app.start(argv)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--flower-port", default=5555, show_default=True, type=click.IntRange(1, 65535))
def run(host: str, port: int, flower_port: int) -> None:
    """Run the whole local stack: migrations, receiver, worker, beat and Flower. Its state (the
    SQLite database, generated secrets, schedule, a private redis) is kept under the home."""
    from worker.run import run_stack

    if port == flower_port:
        raise click.UsageError("--port and --flower-port must differ")
    sys.exit(run_stack(host=host, port=port, flower_port=flower_port))


@main.command()
@click.option("--url", default="http://127.0.0.1:8000/webhooks/clever", show_default=True)
def demo(url: str) -> None:
    """A first look, beside `grassroots run`: seed an example district, send two signed roster
    events, show the accounts before and after."""
    from worker.demo import run_demo

    run_demo(url)


main.add_command(poll_command)


if __name__ == "__main__":
    main()
