"""kombu's Redis transport, with one Redis client per channel instead of one per message.

kombu's Redis channel builds a new ``redis.Redis`` each time it records a delivered message as
unacknowledged and each time it acknowledges one, and redis-py copies its table of about 170
response callbacks into every client it builds. With late acks that is two clients per task: in a
district exit's thousands of short teacher units, the worker's main process spent about a tenth
of its time building them.

The client kept here shares the channel's connection pool, as every client kombu builds does:
each command checks a connection out of that pool, and a pipeline is still made per use. It is
built again when the channel replaces its pool (after a fork, or a reconnection). Everything else
is kombu's own transport; the broker URL stays ``redis://``.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
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
