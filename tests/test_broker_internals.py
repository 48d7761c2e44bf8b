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
from typing import Any

import kombu
import pytest
from kombu.transport import redis as redis_transport

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
        (broker.Channel._create_client, kombu_redis.Channel._create_client),
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
