"""Messages a killed worker took and never acknowledged go back to their queue once no live worker
holds them (``worker.broker.restore_orphans``), not an hour later. A real Redis; the live workers'
answer to Celery's ``query_task`` is played here (the fault tests kill real workers)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.app_env import Configure
from tests.support.stack import RedisServer
from worker.broker import restore_orphans
from worker.celery_app import app


class Workers:
    """What the live workers answer: the task ids each holds (``None``: nobody answers)."""

    def __init__(self) -> None:
        self.holding: dict[str, list[str]] | None = {"w1@host": []}
        self.asked: list[tuple[str, ...]] = []

    def inspect(self, timeout: float) -> Workers:
        return self

    def query_task(self, *ids: str) -> dict[str, dict[str, Any]] | None:
        self.asked.append(ids)
        if self.holding is None:
            return None
        return {
            name: {i: ["active", {}] for i in ids if i in held}
            for name, held in self.holding.items()
        }


@pytest.fixture
def broker(tmp_path: Path, configure: Configure) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path)
    redis.start()
    configure(BROKER_URL=redis.url)
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> Workers:
    live = Workers()
    monkeypatch.setattr(app, "control", live)
    return live


def _take(channel: Any, queue: str, *, delivered_ago: float) -> tuple[str, str]:
    """Deliver a message as a worker does (recorded as unacknowledged), ``delivered_ago`` s ago."""
    message = channel.basic_get(queue, no_ack=False)
    assert message is not None
    with channel.conn_or_acquire() as client:
        client.zadd(channel.unacked_index_key, {message.delivery_tag: time.time() - delivered_ago})
    return message.delivery_tag, message.headers["id"]


def _state(channel: Any, queue: str) -> tuple[int, int]:
    with channel.conn_or_acquire() as client:
        return int(client.llen(queue)), int(client.hlen(channel.unacked_key))


def test_a_message_no_live_worker_holds_goes_back_to_its_queue(
    broker: RedisServer, workers: Workers
) -> None:
    sent = app.send_task("grassroots.exit_unit", (1, "teacher:t1"), queue="fanout")
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        _, task_id = _take(channel, "fanout", delivered_ago=60)
        assert task_id == sent.id
        assert _state(channel, "fanout") == (0, 1)

        assert restore_orphans(app, older_than=30) == [task_id]
        assert _state(channel, "fanout") == (1, 0)
        again = channel.basic_get("fanout", no_ack=True)
        assert again.headers["id"] == task_id
        assert again.payload[0] == [1, "teacher:t1"]


def test_messages_still_held_recent_or_waiting_for_a_countdown_stay(
    broker: RedisServer, workers: Workers
) -> None:
    app.send_task("grassroots.exit_unit", (1, "held"), queue="fanout")
    app.send_task("grassroots.exit_unit", (1, "recent"), queue="fanout")
    app.send_task("grassroots.exit_unit", (1, "countdown"), queue="fanout", countdown=3600)
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        _, held = _take(channel, "fanout", delivered_ago=60)
        _take(channel, "fanout", delivered_ago=5)
        _, waiting = _take(channel, "fanout", delivered_ago=60)
        assert _state(channel, "fanout") == (0, 3)

        workers.holding = {"w1@host": [], "w2@host": [held]}
        assert restore_orphans(app, older_than=30) == []
        # Only the old message that is due was asked about; the others were never candidates.
        assert workers.asked == [(held,)]
        assert _state(channel, "fanout") == (0, 3)

        # Its worker gone, with no worker answering at all: still nothing to go by.
        workers.holding = None
        assert restore_orphans(app, older_than=30) == []
        assert _state(channel, "fanout") == (0, 3)
        assert waiting not in [i for asked in workers.asked for i in asked]


def test_nothing_delivered_asks_no_worker(broker: RedisServer, workers: Workers) -> None:
    assert restore_orphans(app, older_than=30) == []
    assert workers.asked == []
