"""``grassroots serve``'s listeners: uvicorn, on one address or two in one process, with the
limits against hostile clients of ``worker.connection_limits``.

With ``--ops-port`` the process listens twice: the webhook (and health) on ``--host:--port``, the
one address to publish, where Clever reaches; the ops API, the console and ``/metrics`` (and
health) on ``--ops-host:--ops-port``, loopback unless the operator says otherwise. Two uvicorn
servers share one event loop, each with its own app, limits and connection cap (a flood on the
public listener leaves the operators' answering), and one signal stops both.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from worker import connection_limits


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    # The app of ``worker.api`` it serves.
    app: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _options(listener: Listener) -> dict[str, Any]:
    return {
        "app": f"worker.api:{listener.app}",
        "host": listener.host,
        "port": listener.port,
        "access_log": False,
        "log_config": None,
        **connection_limits.UVICORN_LIMITS,
    }


class _Together(uvicorn.Server):
    """One of the process's servers: the signals are taken once for all of them, not by each
    (uvicorn's own handler would stop one and leave the other serving)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve_together(configs: Sequence[uvicorn.Config]) -> bool:
    """Every server until a signal, or until one of them stops (its app failed to start): the
    others stop with it. False if one never started."""
    servers = [_Together(config) for config in configs]
    # Every address taken before any serves: a port in use stops the process at once.
    sockets = [config.bind_socket() for config in configs]

    def stop(signum: int, frame: FrameType | None) -> None:
        for server in servers:
            server.handle_exit(signum, frame)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)

    async def run(server: _Together, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            for other in servers:
                other.should_exit = True

    await asyncio.gather(
        *(run(server, sock) for server, sock in zip(servers, sockets, strict=True))
    )
    return all(server.started for server in servers)


def serve(listeners: Sequence[Listener], *, workers: int = 1) -> None:
    """Serve until SIGINT or SIGTERM; several worker processes only with one listener."""
    if len(listeners) == 1:
        uvicorn.run(**_options(listeners[0]), workers=workers)
        return
    assert workers == 1, "several worker processes serve one listener"
    configs = [uvicorn.Config(**_options(each)) for each in listeners]
    with asyncio.Runner(loop_factory=configs[0].get_loop_factory()) as runner:
        started = runner.run(_serve_together(configs))
    if not started:
        sys.exit(STARTUP_FAILURE)
