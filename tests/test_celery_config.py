"""The Celery app is configured once, safely, and its task names never change."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from kombu import Queue as KombuQueue

from tests.support.stack import RedisServer, spare_port
from worker.broker import TRANSPORT
from worker.celery_app import QUEUES, UnsafeConfiguration, app, build_config, check_safe
from worker.names import ROUTES, TaskName
from worker.settings import load_settings
from worker.tasking import GrassrootsTask

GRASSROOTS = Path(sys.executable).parent / "grassroots"


def test_task_names_are_pinned_because_queued_messages_carry_them() -> None:
    app.loader.import_default_modules()  # what a worker does: registers worker.jobs

    ours = sorted(name for name in app.tasks if name.startswith("grassroots."))
    assert ours == [
        "grassroots.district_exit",
        "grassroots.exit_unit",
        "grassroots.finish_exit",
        "grassroots.heartbeat",
        "grassroots.poll",
        "grassroots.process_event",
        "grassroots.purge",
        "grassroots.release_deferred",
        "grassroots.sync",
        "grassroots.sync_all",
    ]
    assert set(ours) == set(ROUTES) == set(TaskName)
    assert all(isinstance(app.tasks[name], GrassrootsTask) for name in ours)


def test_beat_releases_what_roster_pauses_deferred_within_a_minute() -> None:
    # SPEC §4: deferred events apply on their own within a minute of their pause's end.
    entry = next(
        e for e in app.conf.beat_schedule.values() if e["task"] == "grassroots.release_deferred"
    )
    assert entry["schedule"] <= 30
    assert ROUTES["grassroots.release_deferred"] == {"queue": "maintenance"}


def test_app_is_configured_for_at_least_once_delivery_with_json_only() -> None:
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_ignore_result
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert [q.name for q in conf.task_queues] == list(QUEUES)
    timeout = conf.broker_transport_options["visibility_timeout"]
    assert timeout > load_settings().retry_backoff_max


def test_a_task_stopped_at_its_time_limit_is_put_back_not_acknowledged() -> None:
    conf = app.conf
    settings = load_settings()
    assert conf.task_time_limit == settings.task_time_limit == 1800
    assert conf.task_soft_time_limit == settings.task_time_limit - 30
    assert conf.task_acks_on_timeout is False
    app.loader.import_default_modules()
    for name in TaskName:
        task: Any = app.tasks[name]  # the stubs predate acks_on_timeout
        assert task.acks_late and task.reject_on_worker_lost and task.acks_on_timeout is False
        assert task.max_retries is None  # TASK_MAX_RETRIES, counted in SQL, is the only cap


# Each way the guard refuses a configuration, by what it changes in the app's and what the
# refusal must say; the shipped settings (RETRY_BACKOFF_MAX=600, TASK_TIME_LIMIT=1800).
UNSAFE: dict[str, tuple[dict[str, Any], str]] = {
    "early acks": ({"task_acks_late": False}, "task_acks_late must be on"),
    "acks on a lost worker": (
        {"task_reject_on_worker_lost": False},
        "task_reject_on_worker_lost must be on",
    ),
    "prefetch": ({"worker_prefetch_multiplier": 4}, "worker_prefetch_multiplier must be 1"),
    "pickle accepted": ({"accept_content": ["json", "pickle"]}, "only JSON"),
    "pickle sent": ({"task_serializer": "pickle"}, "only JSON"),
    "acks on timeout": ({"task_acks_on_timeout": True}, "task_acks_on_timeout must be off"),
    "acks on timeout, Celery's fallback": (
        {"task_acks_on_timeout": None, "task_acks_on_failure_or_timeout": True},
        "task_acks_on_timeout must be off",
    ),
    "no time limit": ({"task_time_limit": None}, "task_time_limit must be set"),
    "visibility under the longest retry": (
        {"broker_transport_options": {"visibility_timeout": 600}},
        "the broker visibility timeout (600 s) must be longer than the longest retry countdown"
        " and the time limit together (RETRY_BACKOFF_MAX=600 s + TASK_TIME_LIMIT=1800 s)",
    ),
    "visibility exactly the countdown and the time limit": (
        {"broker_transport_options": {"visibility_timeout": 2400}},
        "the broker visibility timeout (2400 s)",
    ),
    "a time limit the visibility does not cover": (
        {"task_time_limit": 3600, "broker_transport_options": {"visibility_timeout": 3600}},
        "TASK_TIME_LIMIT=3600 s",
    ),
}


@pytest.mark.parametrize(("changes", "says"), list(UNSAFE.values()), ids=list(UNSAFE))
def test_the_guard_refuses_each_unsafe_configuration(changes: dict[str, Any], says: str) -> None:
    conf = app.conf.copy()
    conf.update(changes)
    with pytest.raises(UnsafeConfiguration) as refused:
        check_safe(conf, load_settings())
    assert says in str(refused.value)
    assert str(refused.value).count(";") == 0  # that problem alone


def test_the_guard_accepts_the_shipped_configuration_and_a_visibility_just_long_enough() -> None:
    settings = load_settings()
    check_safe(app.conf, settings)
    conf = app.conf.copy()
    conf["broker_transport_options"] = {"visibility_timeout": 2401}
    check_safe(conf, settings)


@pytest.mark.parametrize(
    ("backoff", "limit"), [(600, 1800), (600, 60), (3600, 1800), (600, 7200), (1, 86400)]
)
def test_the_default_visibility_timeout_covers_any_countdown_and_time_limit(
    backoff: int, limit: float
) -> None:
    settings = load_settings().model_copy(
        update={"retry_backoff_max": backoff, "task_time_limit": limit}
    )
    conf = app.conf.copy()
    conf.update(build_config(settings))
    check_safe(conf, settings)
    assert settings.visibility_timeout >= 3600


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"RETRY_BACKOFF_MAX": "600", "BROKER_VISIBILITY_TIMEOUT": "60"}, "RETRY_BACKOFF_MAX=600"),
        # Long enough for the longest countdown, not for the countdown and a run to the limit.
        (
            {"BROKER_VISIBILITY_TIMEOUT": "1000", "TASK_TIME_LIMIT": "600"},
            "TASK_TIME_LIMIT=600 s",
        ),
    ],
    ids=["countdown", "time limit"],
)
def test_worker_refuses_to_start_with_unsafe_settings(
    tmp_path: Path, settings: dict[str, str], says: str
) -> None:
    env = {
        **os.environ,
        "BROKER_URL": f"redis://127.0.0.1:{spare_port()}/0",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        **settings,
    }
    result = subprocess.run(
        [str(GRASSROOTS), "worker", "--concurrency", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "unsafe Celery configuration" in result.stdout + result.stderr
    assert says in result.stdout + result.stderr


@pytest.mark.parametrize("value", ["abc", "-5", "1e3x"])
def test_a_malformed_visibility_timeout_is_one_clear_line_not_a_traceback(
    tmp_path: Path, value: str
) -> None:
    env = {
        **os.environ,
        "BROKER_URL": f"redis://127.0.0.1:{spare_port()}/0",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "BROKER_VISIBILITY_TIMEOUT": value,
    }
    for command in (["worker", "--concurrency", "1"], ["status"]):
        result = subprocess.run(
            [str(GRASSROOTS), *command],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("grassroots: BROKER_VISIBILITY_TIMEOUT: ")


# Runs ``grassroots worker`` with Celery's worker class replaced by one that reports what it was
# given and which modules the process holds by then (the pool children inherit them all).
WORKER_PROBE = """
import json, sys
from worker.celery_app import app

class Probe:
    def __init__(self, **options):
        self.options = options
        self.exitcode = 3

    def start(self):
        held = sorted(
            name for name in sys.modules
            if name.split(".")[0] in ("flower", "tornado") or name.startswith("celery.bin")
        )
        options = {key: self.options[key] for key in ("queues", "concurrency", "loglevel")}
        print(json.dumps({"options": options, "modules": held}))

app.Worker = Probe
from worker.cli import main
main(sys.argv[1:])
"""


def _worker_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BROKER_URL": f"redis://127.0.0.1:{spare_port()}/0",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
    }
    return subprocess.run(
        [sys.executable, "-c", WORKER_PROBE, "worker", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_worker_starts_without_celerys_command_line_and_its_plugins(tmp_path: Path) -> None:
    # Celery's command line imports every subcommand and plugin (Flower, Tornado, ...): memory
    # the worker and each pool child would hold for nothing.
    result = _worker_command(tmp_path, "-c", "2", "-Q", "fanout, conversions", "-l", "WARNING")
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["modules"] == []
    assert report["options"] == {
        "queues": ["fanout", "conversions"],
        "concurrency": 2,
        "loglevel": logging.WARNING,
    }


def test_worker_refuses_unknown_queues_and_log_levels(tmp_path: Path) -> None:
    unknown_queue = _worker_command(tmp_path, "-Q", "events,urgent")
    assert unknown_queue.returncode == 1
    assert "--queues takes some of events, conversions, fanout, maintenance" in (
        unknown_queue.stderr
    )
    bad_level = _worker_command(tmp_path, "-l", "loud")
    assert bad_level.returncode == 2
    assert "'loud' is not one of" in bad_level.stderr


def test_a_broker_channel_builds_one_redis_client_per_connection_pool() -> None:
    """kombu builds a Redis client for every delivery and ack; ours keeps one per pool."""
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel  # kombu's stubs know only the abstract channel
        assert type(channel).__module__ == "worker.broker"
        first = channel._create_client()
        assert channel._create_client() is first
        assert first.connection_pool is channel.pool
        assert first.ping()
        channel._disconnect_pools()  # what a fork or a reconnection does
        again = channel._create_client()
        assert again is not first and again.connection_pool is channel.pool
        assert again.ping()


def _command_calls(client: Any) -> dict[str, int]:
    return {name: stats["calls"] for name, stats in client.info("commandstats").items()}


def test_deliveries_are_recorded_and_acknowledged_without_transactions(tmp_path: Path) -> None:
    """The late-ack bookkeeping (kombu's unacked index and hash) goes as plain pipelines: no
    MULTI/EXEC per task. A message left unacknowledged is still put back by a restore."""
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        with Connection(redis.url, transport=TRANSPORT) as conn:
            channel: Any = conn.default_channel
            queue = KombuQueue("probe", routing_key="probe")
            producer = conn.Producer(channel)
            for n in range(3):
                producer.publish({"n": n}, routing_key="probe", declare=[queue])
            client = channel._create_client()
            before = _command_calls(client)

            first = channel.basic_get("probe", no_ack=False)
            assert client.zcard(channel.unacked_index_key) == 1
            assert client.hlen(channel.unacked_key) == 1
            first.ack()
            assert client.zcard(channel.unacked_index_key) == 0
            assert client.hlen(channel.unacked_key) == 0

            calls = _command_calls(client)
            assert calls.get("cmdstat_zadd", 0) == before.get("cmdstat_zadd", 0) + 1
            assert calls.get("cmdstat_zrem", 0) == before.get("cmdstat_zrem", 0) + 1
            assert calls.get("cmdstat_multi", 0) == before.get("cmdstat_multi", 0)
            assert calls.get("cmdstat_exec", 0) == before.get("cmdstat_exec", 0)

            second = channel.basic_get("probe", no_ack=False)
            assert second.payload == {"n": 1}
            assert client.llen("probe") == 1
            channel.qos.restore_unacked()  # what a worker shutting down does
            assert client.llen("probe") == 2
            assert client.hlen(channel.unacked_key) == 0
            assert _command_calls(client).get("cmdstat_exec", 0) > calls.get("cmdstat_exec", 0)
    finally:
        redis.stop()
