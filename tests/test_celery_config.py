"""The Celery app is configured once, safely, and its task names never change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.stack import spare_port
from worker.celery_app import QUEUES, ROUTES, UnsafeConfiguration, app, check_safe
from worker.settings import load_settings

GRASSROOTS = Path(sys.executable).parent / "grassroots"


def test_task_names_are_pinned_because_queued_messages_carry_them() -> None:
    import tasks.jobs  # noqa: F401  (registers the tasks)

    ours = sorted(name for name in app.tasks if name.startswith("grassroots."))
    assert ours == sorted(
        [
            "grassroots.district_exit",
            "grassroots.exit_unit",
            "grassroots.finish_exit",
            "grassroots.process_event",
            "grassroots.purge",
            "grassroots.relay",
        ]
        + [name for name in ROUTES if name == "grassroots.poll" and name in app.tasks]
    )
    assert set(ours) <= set(ROUTES)


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


def test_check_refuses_a_visibility_timeout_shorter_than_the_longest_retry() -> None:
    conf = app.conf.copy()
    conf["broker_transport_options"] = {"visibility_timeout": 60}
    settings = load_settings()
    try:
        check_safe(conf, settings)
    except UnsafeConfiguration as exc:
        assert "visibility timeout" in str(exc)
    else:
        raise AssertionError("an unsafe visibility timeout was accepted")


def test_worker_refuses_to_start_with_unsafe_settings(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BROKER_URL": f"redis://127.0.0.1:{spare_port()}/0",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "RETRY_BACKOFF_MAX": "600",
        "BROKER_VISIBILITY_TIMEOUT": "60",
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
