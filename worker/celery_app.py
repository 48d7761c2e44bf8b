"""The Celery app, configured once (SPEC §6). Its tasks are ``worker.jobs``; every task's base class
is ``worker.tasking.GrassrootsTask``."""

from __future__ import annotations

import gc
from typing import Any

from celery import Celery, signals
from kombu import Queue as KombuQueue

from worker import broker, logs
from worker.names import ROUTES, Queue, TaskName
from worker.settings import Settings, get_settings

QUEUES = tuple(str(queue) for queue in Queue)
# Seconds between passes releasing what ended roster pauses deferred.
RELEASE_INTERVAL = 30.0


class UnsafeConfiguration(RuntimeError):
    """The worker would lose or duplicate work with these settings: it refuses to start."""


# Seconds a command to Redis may wait for its answer (or a connection to be made) before it
# fails as a connection error. Without a bound, a Redis that stops answering without closing the
# connection (paused, failing over, behind a dead NAT entry) hangs whatever sends to it: the
# receiver's send thread and its shutdown, an operator's `POST /ops/districts/{id}/exit`. A send
# is tried three or four times (``task_publish_retry_policy``) before it gives up: about 4 s.
# Waiting for work is not bounded by this: a worker's BRPOP (1 s on the server) is read only once
# its socket is readable, and kombu drops a BRPOP connection whose answer is overdue.
SEND_SOCKET_TIMEOUT = 1.0
# The worker's own connection: a Redis stall this long is taken as a lost connection, which
# reconnects and cancels the running tasks (``worker_cancel_long_running_tasks_on_connection_loss``;
# they run again): a brief stall must not do that, a dead connection must not hang the worker.
WORKER_SOCKET_TIMEOUT = 10.0


def transport_options(
    settings: Settings, *, socket_timeout: float = SEND_SOCKET_TIMEOUT
) -> dict[str, Any]:
    timeout = settings.visibility_timeout
    # kombu sweeps for unacknowledged messages of dead workers every interval x throttle seconds
    # (100 s by default): keep that well under a short visibility timeout.
    short = timeout < 600
    return {
        "visibility_timeout": timeout,
        "unacked_restore_interval": max(1, min(10, timeout // 10)),
        "unacked_restore_throttle": 1 if short else 10,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
    }


def build_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "broker_transport": broker.TRANSPORT,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        "broker_transport_options": transport_options(settings),
        # A sender must not hang while Redis is away: the inbox row is committed, and the relay
        # enqueues it when Redis returns.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "task_track_started": False,
        "worker_prefetch_multiplier": 1,
        # No task holds a pool slot for good. The soft limit raises in the task, which ends the
        # attempt and sends the task again (``worker.tasking``); the hard one, for a task the
        # soft one could not interrupt, ends its process. Its message is then put back, not
        # acknowledged (Celery's default): delivered again, its attempt counted in SQL.
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": settings.task_time_limit - 30,
        "task_acks_on_timeout": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Task events cost the worker's main process a Redis round trip each, three per task,
        # paid one task at a time in a district exit. Flower turns them on while it watches
        # (its --enable_events, on by default); nothing else reads them.
        "worker_send_task_events": False,
        "task_default_queue": Queue.EVENTS,
        "task_queues": [KombuQueue(name) for name in QUEUES],
        "task_routes": ROUTES,
        # The relay is not on the schedule: it is a loop of beat's own (``worker.relay``).
        "beat_schedule": {
            "purge": {"task": TaskName.PURGE, "schedule": 3600.0},
            # What roster pauses deferred is applied within a minute of their end (SPEC §4). A
            # pass that waited its interval in the queue is dropped: the next one does the same.
            "release-deferred": {
                "task": TaskName.RELEASE_DEFERRED,
                "schedule": RELEASE_INTERVAL,
                "options": {"expires": RELEASE_INTERVAL},
            },
            # Only with district tokens to poll. A pass that waited a whole interval in the
            # queue is dropped: the next one reads the same feed from the same cursor.
            **(
                {
                    "poll": {
                        "task": TaskName.POLL,
                        "schedule": settings.poll_interval,
                        "options": {"expires": settings.poll_interval},
                    }
                }
                if settings.clever_district_tokens
                else {}
            ),
            # Proof that a worker takes work from the events queue (``/readyz``). One that waited
            # a whole interval is dropped: the next one proves the same, later.
            "heartbeat": {
                "task": TaskName.HEARTBEAT,
                "schedule": settings.heartbeat_interval,
                "options": {"expires": settings.heartbeat_interval},
            },
            # A roster sync of every district with a token, unless SYNC_INTERVAL is 0.
            **(
                {
                    "sync": {
                        "task": TaskName.SYNC_ALL,
                        "schedule": settings.sync_interval,
                        "options": {"expires": settings.sync_interval},
                    }
                }
                if settings.clever_district_tokens and settings.sync_interval > 0
                else {}
            ),
        },
        "timezone": "UTC",
        "enable_utc": True,
    }


def check_safe(conf: Any, settings: Settings) -> None:
    problems = []
    if not conf.task_acks_late:
        problems.append("task_acks_late must be on (a crash would lose the task)")
    if conf.task_acks_late and not conf.task_reject_on_worker_lost:
        problems.append("task_reject_on_worker_lost must be on with late acks")
    if conf.worker_prefetch_multiplier != 1:
        problems.append("worker_prefetch_multiplier must be 1")
    if set(conf.accept_content or []) != {"json"} or conf.task_serializer != "json":
        problems.append("only JSON serialization is allowed")
    if conf.task_acks_late and _acks_on_timeout(conf):
        problems.append(
            "task_acks_on_timeout must be off (a task stopped at its time limit would be"
            " acknowledged as finished)"
        )
    timeout = (conf.broker_transport_options or {}).get("visibility_timeout", 3600)
    limit = conf.task_time_limit
    if not limit:
        problems.append("task_time_limit must be set (a hung task would hold its slot for good)")
    elif timeout <= settings.retry_backoff_max + limit:
        # A delivered message is the worker's through its retry countdown and then its run:
        # restored before both are over, it would run twice at once.
        problems.append(
            f"the broker visibility timeout ({timeout} s) must be longer than the longest retry"
            " countdown and the time limit together"
            f" (RETRY_BACKOFF_MAX={settings.retry_backoff_max} s + TASK_TIME_LIMIT={limit:g} s)"
        )
    if problems:
        raise UnsafeConfiguration("unsafe Celery configuration: " + "; ".join(problems))


def _acks_on_timeout(conf: Any) -> bool:
    # Celery's own fallback: the older setting that covers failures and timeouts both.
    own = conf.task_acks_on_timeout
    return bool(conf.task_acks_on_failure_or_timeout if own is None else own)


def create_app() -> Celery:
    celery = Celery("grassroots", include=["worker.jobs"], task_cls="worker.tasking:GrassrootsTask")
    celery.conf.update(build_config(get_settings()))
    return celery


app = create_app()


@signals.worker_init.connect
def _refuse_unsafe(sender: Any = None, **_: Any) -> None:
    # For workers started as ``celery -A worker.celery_app worker``. Celery logs and swallows
    # exceptions from signal receivers, so leave with SystemExit, which it does not catch.
    try:
        check_safe(app.conf, get_settings())
    except UnsafeConfiguration as exc:
        raise SystemExit(f"grassroots: {exc}") from exc


@signals.worker_init.connect
def _patient_broker_connection(**_: Any) -> None:
    # Before the worker connects; its pool children inherit it for what they send.
    app.conf.broker_transport_options = transport_options(
        get_settings(), socket_timeout=WORKER_SOCKET_TIMEOUT
    )


@signals.worker_init.connect
def _share_memory_with_the_pool(**_: Any) -> None:
    # Before the pool forks: a child's garbage collector then leaves the objects it inherited
    # alone, instead of writing to (and so copying) every page that holds one.
    gc.freeze()


@signals.setup_logging.connect
def _json_logs(**_: Any) -> None:
    # Connecting here stops Celery from installing its own handlers: worker and beat log JSON.
    logs.configure("celery")
