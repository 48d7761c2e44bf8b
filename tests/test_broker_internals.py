"""The kombu internals ``worker/broker.py`` relies on, pinned: kombu is held to the tested minor
(pyproject.toml), and a release that changes any of these fails here, loudly, before a worker
runs with a transport whose assumptions no longer hold.

Each fingerprint is the SHA-256 of the method's source in the tested kombu. When one fails: read
the new kombu code against the docstring of ``worker/broker.py`` (what it overrides and why that
is safe), adapt the override if needed, then record the new fingerprint here."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis
from kombu import Connection
from kombu import Queue as KombuQueue
from kombu.common import ignore_errors
from kombu.transport import redis as redis_transport
from kombu.transport.virtual import base as virtual

from tests.support.stack import RedisServer
from worker import broker

# kombu's stubs know only the abstract transport.
kombu_redis: Any = redis_transport

# (owner, method): what worker/broker.py overrides, calls, or mirrors.
FINGERPRINTS: dict[tuple[type[Any], str], str] = {
    # Overridden: a plain pipeline instead of MULTI/EXEC, for recording and acknowledging.
    (kombu_redis.QoS, "pipe_or_acquire"): "ad7f549d96c81107",
    # Its callers: what they send through the pipeline, and restore's own transaction.
    (kombu_redis.QoS, "append"): "35c655f6ecc62fe6",
    (kombu_redis.QoS, "_remove_from_indices"): "980a109d54ad9136",
    (kombu_redis.QoS, "restore_by_tag"): "58e161d81b6fe18d",
    # Overridden: one client per channel and pool, built again when the pool is replaced.
    (kombu_redis.Channel, "_create_client"): "dae92bc4075dafb9",
    (kombu_redis.Channel, "conn_or_acquire"): "25883caca6c4121e",
    # Overridden: a restore that cannot reach Redis is left for the next channel, which puts
    # it back once connected (``__init__``: a channel pings Redis on creation).
    (kombu_redis.QoS, "restore_unacked"): "8954efef014d546e",
    (virtual.QoS, "restore_unacked_once"): "c81f3d0fb29b9599",
    (kombu_redis.Channel, "__init__"): "f189bdebe2436ccd",
    # Its caller on a lost connection, and what drops the pool before it.
    (kombu_redis.Channel, "close"): "101e9b9cdad44b88",
    (kombu_redis.Channel, "_disconnect_pools"): "db50da048a22b16d",
    # Mirrored by ``queue_depths``: the name of each priority level's list.
    (kombu_redis.Channel, "_q_for_pri"): "f3997660680dd00f",
}


def fingerprint(method: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(method).encode()).hexdigest()[:16]


def test_kombu_is_the_tested_minor() -> None:
    version = getattr(kombu, "__version__", "")
    assert version.startswith("5.7."), (
        f"kombu {version}: worker/broker.py was written against 5.7; see this module"
    )


@pytest.mark.parametrize(
    ("owner", "name"), list(FINGERPRINTS), ids=[f"{o.__name__}.{n}" for o, n in FINGERPRINTS]
)
def test_the_kombu_code_the_transport_relies_on_is_unchanged(owner: type[Any], name: str) -> None:
    assert fingerprint(getattr(owner, name)) == FINGERPRINTS[owner, name], (
        f"kombu changed {owner.__name__}.{name}: re-check worker/broker.py (its docstring says"
        " what it assumes), then record the new fingerprint in this test"
    )


def test_the_overrides_keep_kombus_signatures() -> None:
    for ours, theirs in (
        (broker.QoS.pipe_or_acquire, kombu_redis.QoS.pipe_or_acquire),
        (broker.QoS.restore_unacked, kombu_redis.QoS.restore_unacked),
        (broker.Channel._create_client, kombu_redis.Channel._create_client),
        (broker.Channel.__init__, kombu_redis.Channel.__init__),
    ):
        assert [p.name for p in inspect.signature(ours).parameters.values()] == [
            p.name for p in inspect.signature(theirs).parameters.values()
        ]
    assert broker.Channel.QoS is broker.QoS and broker.Transport.Channel is broker.Channel


def test_the_keys_status_and_the_relay_read_are_kombus() -> None:
    assert kombu_redis.Channel.unacked_key == "unacked"
    assert kombu_redis.Channel.unacked_index_key == "unacked_index"
    channel = kombu_redis.Channel.__new__(kombu_redis.Channel)
    channel.priority_steps = kombu_redis.Channel.priority_steps
    levels = [channel._q_for_pri("events", p) for p in kombu_redis.Channel.priority_steps]
    assert levels == [f"events{suffix}" for suffix in broker._PRIORITY_SUFFIXES]


# --------------------------------------------------------------------------------------------
# The overrides against a real redis-server that goes away (append-only, as `grassroots run`
# and compose keep it, so what it held is there again when it comes back)


def _unacked(client: Any) -> tuple[int, int]:
    return client.zcard(kombu_redis.Channel.unacked_index_key), client.hlen(
        kombu_redis.Channel.unacked_key
    )


def test_a_redis_that_goes_away_under_unacknowledged_messages_loses_none(tmp_path: Path) -> None:
    """A message taken and not acknowledged when Redis is killed: the ack on the lost
    connection fails as a connection error; closing the connection as Celery does (anything
    but a connection error ends the worker) raises nothing, though kombu's restore cannot reach
    Redis; the next connection, once Redis is back, puts the message back in its queue, once."""
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    try:
        conn = Connection(server.url, transport=broker.TRANSPORT)
        channel: Any = conn.default_channel
        queue = KombuQueue("probe", routing_key="probe")
        producer = conn.Producer(channel)
        for n in range(2):
            producer.publish({"n": n}, routing_key="probe", declare=[queue])
        client = channel._create_client()  # the channel's one client (``_create_client``)
        assert channel._create_client() is client
        taken = channel.basic_get("probe", no_ack=False)  # recorded (``pipe_or_acquire``)
        assert taken.payload == {"n": 0} and _unacked(client) == (1, 1)

        server.kill()
        with pytest.raises(redis.ConnectionError):
            taken.ack()  # on the lost connection: a connection error, which Celery logs
        # What Celery's consumer does with a connection it lost: collect it, then close it,
        # letting only connection errors through. kombu's restore cannot reach Redis.
        with suppress(Exception):
            conn.collect(socket_timeout=1)
        ignore_errors(conn, conn.close)
        assert broker._left_behind == {taken.delivery_tag}
        # A closed channel without a pool fails as a lost connection, where kombu would build a
        # pool from the released connection's address (an AttributeError: the worker's end).
        channel._disconnect_pools()
        with pytest.raises(redis.ConnectionError, match="closed"):
            channel._create_client()
        with pytest.raises(redis.ConnectionError, match="closed"):
            channel.qos.restore_by_tag(taken.delivery_tag)

        server.start()
        with Connection(server.url, transport=broker.TRANSPORT) as again:
            fresh: Any = again.default_channel  # puts back what was left behind
            assert broker._left_behind == set()
            check = fresh._create_client()
            assert check is not client and check.connection_pool is fresh.pool
            assert _unacked(check) == (0, 0)
            assert check.llen("probe") == 2
            # Put back once: a second restore of the same tag finds nothing to restore.
            fresh.qos.restore_by_tag(taken.delivery_tag)
            assert check.llen("probe") == 2
            got = [fresh.basic_get("probe", no_ack=False) for _ in range(2)]
            assert sorted(m.payload["n"] for m in got) == [0, 1]
            assert _unacked(check) == (2, 2)  # recorded on the new connection's pool
            for message in got:
                message.ack()
            assert _unacked(check) == (0, 0)
    finally:
        broker._left_behind.clear()
        server.stop()
