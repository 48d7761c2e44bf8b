"""The long-running processes and the tools around them: ``serve``, ``worker``, ``beat``,
``flower``, ``run`` (all of them at once), ``demo`` and ``send-webhook``.

The Celery app, uvicorn, httpx, structlog (``worker.logs``), the relay and the demo are imported
inside the commands that run them: `grassroots --help` and the other commands do without them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from worker.cli.common import LOG_LEVEL_OPTION, fail, webhook_secret
from worker.db import require_stack
from worker.listeners import not_answering, webhook_url
from worker.run import run_stack
from worker.settings import get_settings
from worker.signing import signed_headers

URL_OPTION = click.option(
    "--url",
    default=None,
    help="The receiver's webhook URL [default: where `grassroots run` recorded its receiver in the"
    " home, else http://127.0.0.1:8000/webhooks/clever].",
)
# ``serve --routes``: the app of ``worker.api`` each serves (named here, so that the command
# line does without importing the HTTP app).
SERVED_APPS = {"all": "app", "webhooks": "webhooks_app", "ops": "ops_app"}


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="uvicorn worker processes (one listener only).",
)
@click.option(
    "--routes",
    default="all",
    show_default=True,
    type=click.Choice(list(SERVED_APPS)),
    help="What this listener serves: webhooks (POST /webhooks/clever), ops (/ops/..., the"
    " console, /metrics) or all; /healthz and /readyz always.",
)
@click.option(
    "--ops-port",
    default=None,
    type=click.IntRange(1, 65535),
    help="A second listener for the ops API, the console and /metrics; --port then serves the"
    " webhook alone (with /healthz and /readyz). Publish only --port.",
)
@click.option(
    "--ops-host",
    default="127.0.0.1",
    show_default=True,
    help="The address of the --ops-port listener.",
)
def serve(
    host: str, port: int, workers: int, routes: str, ops_port: int | None, ops_host: str
) -> None:
    """Run the webhook receiver and ops API."""
    # Imported here: uvicorn would slow every other command's start.
    from worker.logs import configure
    from worker.serving import Listener
    from worker.serving import serve as serve_listeners

    listeners = [Listener(host, port, SERVED_APPS[routes])]
    if ops_port is not None:
        if routes != "all":
            raise click.UsageError("--ops-port splits the routes itself: leave out --routes")
        if workers != 1:
            raise click.UsageError(
                "--workers serves one listener: run `serve --routes webhooks --workers N` and"
                " `serve --routes ops` instead of --ops-port"
            )
        if (ops_host, ops_port) == (host, port):
            raise click.UsageError("--ops-port and --port must differ")
        listeners = [
            Listener(host, port, SERVED_APPS["webhooks"]),
            Listener(ops_host, ops_port, SERVED_APPS["ops"]),
        ]
    configure("serve")
    serve_listeners(listeners, workers=workers)


@click.command()
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
    default=None,
    help="The queues to consume, comma-separated [default: every queue].",
)
@click.option(
    "--hostname",
    "-n",
    default=None,
    help="Node name, as Celery's (%h expands to the host) [default: grassroots-<pid>@<host>].",
)
@LOG_LEVEL_OPTION
def worker(
    concurrency: int | None, queues: str | None, hostname: str | None, loglevel: str
) -> None:
    """Run a Celery worker. Start more on more machines to scale out."""
    # Imported here: Celery would slow every other command's start.
    from celery.utils.log import mlevel
    from celery.utils.nodenames import default_nodename, host_format

    from worker.celery_app import QUEUES, UnsafeConfiguration, app, check_safe
    from worker.logs import quiet_root_warning

    # With no stack here, refused now rather than in every task (the receiver starts anyway:
    # its /healthz needs no database).
    require_stack()
    try:
        check_safe(app.conf, get_settings())
    except UnsafeConfiguration as exc:
        fail(str(exc))
    names = list(QUEUES) if queues is None else [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - set(QUEUES))
    if not names or unknown:
        fail(f"--queues takes some of {', '.join(QUEUES)}; got {queues!r}")
    # Started as ``celery worker`` would start it, without going through Celery's command line:
    # that imports every Celery subcommand and plugin (Flower's among them, with Tornado and
    # prometheus_client), about 12 MB that the worker and each of its pool children would hold.
    quiet_root_warning()
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


@click.command()
@LOG_LEVEL_OPTION
def beat(loglevel: str) -> None:
    """Run the scheduler (relay of undelivered events, purge, poll)."""
    # Imported here: Celery would slow every other command's start.
    from celery import signals

    from worker import relay
    from worker.celery_app import app

    def start_relay(**_: Any) -> None:
        # Every RELAY_INTERVAL seconds, in the one beat a deployment runs; a thread rather than
        # a scheduled task, so an idle relay writes no log lines and no task rows in Flower.
        relay.start(get_settings().relay_interval)

    signals.beat_init.connect(start_relay, weak=False)
    home = get_settings().home
    home.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "-l", loglevel, "-s", str(home / "celerybeat-schedule")])


@click.command()
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", default=5555, show_default=True, type=click.IntRange(1, 65535))
def flower(address: str, port: int) -> None:
    """Run Flower (queue depth per queue, workers, tasks), behind basic auth: FLOWER_BASIC_AUTH
    (user:password; `grassroots run` generates one in the home) is required on every address."""
    auth = get_settings().flower_basic_auth
    # Loopback included: any local user or process, and any web page a browser on this machine
    # opens, could otherwise send tasks through Flower's API.
    if not auth:
        fail(
            f"refusing to serve Flower on {address or 'every interface'} without"
            " FLOWER_BASIC_AUTH (user:password)"
        )
    # Imported here: Celery would slow every other command's start.
    from worker.celery_app import app
    from worker.flower_app import install
    from worker.logs import quiet_flower_no_reply

    # Its /metrics behind its login too, and no version in its Server header.
    install()
    # With the Redis broker Flower reads each named queue's depth from Redis itself, choosing its
    # reader by the scheme of the broker URL kombu gives back: it needs kombu's own transport
    # for that (``worker.broker`` only serves the worker's message handling).
    app.conf.broker_transport = None
    # Flower reads its options from FLOWER_* variables too: the credentials go that way, never
    # on the command line, which `ps` shows to every user. No inherited variable may open its
    # API without them.
    os.environ["FLOWER_BASIC_AUTH"] = auth
    os.environ.pop("FLOWER_UNAUTHENTICATED_API", None)
    quiet_flower_no_reply()
    app.start(["flower", f"--address={address}", f"--port={port}", "--purge_offline_workers=60"])


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--ops-port",
    default=None,
    type=click.IntRange(1, 65535),
    help="The ops API, the console and /metrics, on 127.0.0.1 whatever --host says [default:"
    " --port + 1, or any free port if that one is taken; recorded in the home].",
)
@click.option("--flower-port", default=5555, show_default=True, type=click.IntRange(1, 65535))
def run(host: str, port: int, ops_port: int | None, flower_port: int) -> None:
    """Run the whole local stack: migrations, receiver, worker, beat and Flower. Its state (the
    SQLite database, generated secrets, schedule, a private redis) is kept under the home."""
    if port == flower_port or ops_port in (port, flower_port):
        raise click.UsageError("--port, --ops-port and --flower-port must differ")
    sys.exit(run_stack(host=host, port=port, ops_port=ops_port, flower_port=flower_port))


@click.command()
@URL_OPTION
def demo(url: str | None) -> None:
    """A first look, beside `grassroots run`: seed an example district, send two signed roster
    events, show the accounts before and after."""
    # Imported here: the demo's HTTP client would slow every command's start.
    from worker.demo import DemoError, run_demo

    # The stack first: with none here, that is what to say, not that there is no secret.
    require_stack()
    try:
        run_demo(webhook_url(get_settings().home, url), webhook_secret())
    except DemoError as exc:
        fail(str(exc))


@click.command("send-webhook")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@URL_OPTION
def send_webhook(file: Path, url: str | None) -> None:
    """Sign an event file with the first WEBHOOK_SECRETS secret (or the stack's) and POST it."""
    # Imported here: httpx would slow every other command's start.
    import httpx

    secret = webhook_secret()
    try:
        body = file.read_bytes()
    except OSError as exc:
        fail(f"{file}: cannot read: {exc.strerror}")
    headers = {"content-type": "application/json", **signed_headers(secret, body)}
    target = webhook_url(get_settings().home, url)
    try:
        response = httpx.post(target.url, content=body, headers=headers, timeout=10)
    except httpx.TransportError as exc:
        fail(not_answering(target, exc))
    except httpx.HTTPError as exc:
        fail(f"{target.url}: {type(exc).__name__}: {exc}")
    click.echo(f"{response.status_code} {response.text}")
    if response.status_code >= 300:
        sys.exit(1)
