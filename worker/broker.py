"""kombu's Redis transport, with one Redis client per channel instead of one per message, and
its acknowledgement bookkeeping sent without MULTI/EXEC.

kombu's Redis channel builds a new ``redis.Redis`` each time it records a delivered message as
unacknowledged and each time it acknowledges one, and redis-py copies its table of about 170
response callbacks into every client it builds. With late acks that is two clients per task, which
the worker's main process builds one task at a time: a measurable share of its time in a district
exit's thousands of short teacher units (figures in bench/README.md).

The client kept here shares the channel's connection pool, as every client kombu builds does:
each command checks a connection out of that pool, and a pipeline is still made per use. It is
built again when the channel replaces its pool (after a fork, or a reconnection).

With late acks, the main process records each delivered message as unacknowledged (ZADD to an
index, HSET of the message) and removes both on its ack, two commands each time, which kombu
wraps in MULTI/EXEC. The worker's main process does this for every task, one task at a time,
and the transaction doubles the commands Redis and redis-py handle (bench/README.md has the
per-task cost of each). ``QoS`` sends the two commands as a plain pipeline, in one write on one
connection, which Redis runs in order. Nothing depends on their being atomic. No restore looks
at a message recorded less than the visibility timeout ago. A pipeline cut short (the
connection lost halfway) applies only its first command: when recording, an index entry with no
message, which a restore drops (with MULTI nothing at all would be recorded; either way the
message is the worker's alone, as it already is between its BRPOP and this record); when
acknowledging, a stored message with no index entry, which no restore ever redelivers, as none
should. kombu's restores (``restore_by_tag``) keep their WATCH/MULTI transaction.

A Redis that goes away under a busy worker: the worker closes its channel, and kombu puts the
messages it took and has not acknowledged back in their queues (``restore_unacked``), on a
connection that is gone. kombu's channel then builds a new connection pool from a connection
already closed (an ``AttributeError`` that ends the worker), or the restore fails on the dead
socket and the messages stay in Redis's unacknowledged hash until the visibility timeout (an
hour) while Celery has cancelled their tasks. Here a channel whose connection is closed fails as
a lost connection, which Celery handles, and what could not be put back is put back by the next
channel this process opens, once Redis answers again (with an append-only Redis the hash
survives the restart; a message restored twice is restored once, in kombu's transaction).

Everything else is kombu's own transport; the broker URL stays ``redis://``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import redis
from kombu.transport import redis as kombu_redis

from worker.settings import get_settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("grassroots.broker")

# What a lost connection kept the worker from putting back: the delivery tags of messages still
# in Redis's unacknowledged hash. The process's next channel puts them back.
_left_behind: set[str] = set()
_left_behind_lock = threading.Lock()
LOST = (redis.ConnectionError, redis.TimeoutError, OSError)


class QoS(kombu_redis.QoS):
    @contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        if pipe is not None:  # a restore's transaction
            yield pipe
            return
        with self.channel.conn_or_acquire(client) as conn:  # type: ignore[attr-defined]
            yield conn.pipeline(transaction=False)

    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)
        except LOST as exc:
            delivered: Any = self._delivered
            tags = set(delivered)
            # kombu's restore runs once per channel: it asserts nothing is left when it is done.
            delivered.clear()
            with _left_behind_lock:
                _left_behind.update(tags)
            log.warning(
                "the broker went away before %d unacknowledged message(s) could be put back"
                " (%s): they are put back on the next connection",
                len(tags),
                type(exc).__name__,
            )

    def restore_left_behind(self) -> int:
        """Put back what a lost connection kept this process from putting back; how many."""
        with _left_behind_lock:
            tags = list(_left_behind)
            _left_behind.clear()
        restored = 0
        for n, tag in enumerate(tags):
            try:
                self.restore_by_tag(tag)
            except LOST:
                with _left_behind_lock:
                    _left_behind.update(tags[n:])
                break
            restored += 1
        if restored:
            log.warning("put back %d message(s) a lost broker connection had left", restored)
        return restored


class Channel(kombu_redis.Channel):
    QoS = QoS
    _shared_client: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # connects: Redis answers
        if _left_behind:
            qos: Any = self.qos
            qos.restore_left_behind()

    def _create_client(self, asynchronous: bool = False) -> Any:
        pool = self._async_pool if asynchronous else self._pool  # type: ignore[attr-defined]
        if pool is None and getattr(self.connection, "client", None) is None:
            # Closed: kombu would build a pool from the connection's address, which is gone.
            raise redis.ConnectionError("the broker connection is closed")
        if asynchronous:  # the event loop's client, which kombu already keeps for the channel
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        client = self._shared_client
        if client is None or client.connection_pool is not self.pool:
            client = self._shared_client = super()._create_client()  # type: ignore[misc]
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


# For Celery's ``broker_transport`` setting.
TRANSPORT = f"{__name__}:Transport"


# --------------------------------------------------------------------------------------------
# Reading the queues (status, metrics, the relay)

# kombu's Redis transport keeps each priority level of a queue in its own list, named as its
# ``Channel._q_for_pri`` names it (the level 0 list is the queue's own name).
_PRIORITY_SUFFIXES = tuple(
    f"{kombu_redis.Channel.sep}{level}" if level else ""
    for level in kombu_redis.Channel.priority_steps
)


def broker_client() -> redis.Redis:
    """A plain Redis client of the broker, with short timeouts: a status never hangs on it. One
    per process and broker: its pool keeps its connections, so a probe, a scrape or a relay pass
    opens none (redis-py's pool starts afresh in a forked child)."""
    return _client(get_settings().broker_url)


@lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def queue_depths(client: redis.Redis, queues: Sequence[str]) -> tuple[dict[str, int], int]:
    """Messages waiting per named queue, and messages delivered but not yet acknowledged
    (running, or waiting out a retry countdown)."""
    pipe = client.pipeline()
    for name in queues:
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(name + suffix)
    pipe.hlen(kombu_redis.Channel.unacked_key)
    counts = pipe.execute()
    per = len(_PRIORITY_SUFFIXES)
    depths = {name: sum(counts[i * per : (i + 1) * per]) for i, name in enumerate(queues)}
    return depths, int(counts[-1])


def unacked_in(client: redis.Redis, queue: str) -> int:
    """Messages taken from ``queue`` and not yet acknowledged (kombu keeps each as JSON
    ``[message, exchange, routing key]``; a routing key names its queue)."""
    stored = client.hvals(kombu_redis.Channel.unacked_key)
    return sum(1 for message in stored if json.loads(message)[2] == queue)


# Queued messages ``count_task`` reads at most: a queue longer than this is busy anyway, and
# reading it whole would cost the caller more than the count is worth.
COUNT_SCAN_LIMIT = 1000


def count_task(
    client: redis.Redis, queue: str, task: str, *, unacked: bool, scan: int = COUNT_SCAN_LIMIT
) -> int:
    """Messages of ``task`` waiting in ``queue`` (counted only while the queue holds at most
    ``scan`` messages), plus, with ``unacked``, those any worker has taken and not yet
    acknowledged."""
    keys = [queue + suffix for suffix in _PRIORITY_SUFFIXES]
    pipe = client.pipeline()
    for key in keys:
        pipe.llen(key)
    stored: list[bytes] = []
    if 0 < sum(pipe.execute()) <= scan:
        for key in keys:
            pipe.lrange(key, 0, -1)
        stored = [message for found in pipe.execute() for message in found]
    found = sum(1 for message in stored if _task_name(json.loads(message)) == task)
    if unacked:
        kept = client.hvals(kombu_redis.Channel.unacked_key)
        found += sum(1 for message in kept if _task_name(json.loads(message)[0]) == task)
    return found


def _task_name(message: dict[str, Any]) -> str | None:
    name = (message.get("headers") or {}).get("task")
    return name if isinstance(name, str) else None


def held_task_ids(client: redis.Redis) -> set[str]:
    """The ids of the tasks whose messages workers have taken and not yet acknowledged: running,
    reserved, waiting out a retry countdown, or a killed worker's until they are put back."""
    held = set()
    for stored in client.hvals(kombu_redis.Channel.unacked_key):
        task_id = (json.loads(stored)[0].get("headers") or {}).get("id")
        if task_id:
            held.add(task_id)
    return held


def _due(headers: dict[str, Any]) -> float:
    """When a delivered task message was to run: its ETA (a retry's countdown), or at once."""
    eta = headers.get("eta")
    return datetime.fromisoformat(eta).timestamp() if eta else 0.0


def restore_orphans(app: Celery, *, older_than: float, reply_timeout: float = 1.0) -> list[str]:
    """Put back in their queues the task messages that a worker took and never acknowledged, when
    no live worker holds them any more: their worker was killed. Returns their task ids.

    kombu restores such a message only once the visibility timeout has passed (an hour, as it
    must outlast any retry countdown a live worker waits out). Until then its task is neither
    done nor queued, and the pipeline's ``pending`` count does not come back to 0. Here, a
    message delivered more than ``older_than`` seconds ago, and due that long ago (a retry
    waiting for its countdown is not), is looked up in the live workers (Celery's
    ``query_task``, which knows what each one runs, has reserved or waits to run). One that none
    of them holds goes back to its queue, as kombu's own restore puts it back. If no worker
    answers, nothing is restored: there is nothing to compare with.

    A task that is put back while its first copy still runs after all (a worker that did not
    answer in time) runs twice, which every task allows: each one finds work already done and
    does nothing the second time.
    """
    cutoff = time.time() - older_than
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        with channel.conn_or_acquire() as client:
            tags = client.zrangebyscore(channel.unacked_index_key, "-inf", cutoff)
            if not tags:
                return []
            orphans: dict[bytes, str] = {}
            for tag, stored in zip(tags, client.hmget(channel.unacked_key, tags), strict=True):
                if stored is None:  # acknowledged meanwhile
                    continue
                headers = json.loads(stored)[0].get("headers") or {}
                if "id" in headers and _due(headers) < cutoff:
                    orphans[tag] = headers["id"]
            if not orphans:
                return []
            replies = app.control.inspect(timeout=reply_timeout).query_task(*orphans.values())
            if not replies:
                return []
            held = {task_id for found in replies.values() for task_id in found}
            restored = []
            for tag, task_id in orphans.items():
                if task_id not in held:
                    channel.qos.restore_by_tag(tag, client=client)
                    restored.append(task_id)
            return restored
