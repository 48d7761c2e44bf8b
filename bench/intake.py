#!/usr/bin/env python3
"""Benchmark: webhook intake of `grassroots serve` (verify, commit to the inbox, enqueue).

Starts a private redis-server and `grassroots serve` against a fresh Postgres database, then:
1. burst: N signed events as fast as C keep-alive connections can send them -> events/s;
2. steady: events at a fixed rate (open loop, default 500/s) -> p50 / p99 latency, measured from
   the moment each request was due to leave, so a client that falls behind shows up as latency;
3. checks that every event sent is in the inbox and in the broker's queue.
No workers run: this measures the receiver alone.

The load generator shares the machine, so it is kept lean: requests are signed before a phase
starts (timestamps stay well inside the 5-minute tolerance) and written as raw HTTP/1.1 on
asyncio streams, one request at a time per connection. Every answer that is not a 202, and every
connection error, is counted and reported.

    .venv/bin/python -m bench.intake [--burst 10000] [--rate 500] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import redis

from bench.common import BIN, print_report, private_redis, spare_port, throwaway_database
from worker.signing import generate_secret, signed_headers

PATH = "/webhooks/clever"
T = TypeVar("T")


def signed_request(secret: str, event: dict[str, Any]) -> bytes:
    """A signed webhook delivery of ``event``, a whole HTTP/1.1 message ready to write."""
    body = json.dumps(event).encode()
    headers = {
        "host": "receiver",
        "content-type": "application/json",
        "content-length": str(len(body)),
        **signed_headers(secret, body),
    }
    head = f"POST {PATH} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


def requests(secret: str, prefix: str, n: int) -> list[bytes]:
    """``n`` signed requests, whole HTTP/1.1 messages ready to write to a socket."""
    return [
        signed_request(
            secret,
            {
                "id": f"{prefix}-{i}",
                "type": "users.updated",
                "created": "2026-10-01T00:00:00Z",
                "data": {
                    "object": {"id": f"{i:024x}", "district": "d" * 24, "roles": {"student": {}}}
                },
            },
        )
        for i in range(n)
    ]


class Connection:
    """One keep-alive HTTP/1.1 connection; one request in flight at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """The status and body of the answer. Raises if the connection broke."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        body = await self.reader.readexactly(length)
        if close:
            raise ConnectionError(f"the server closed the connection after a {status}")
        return status, body

    def close(self) -> None:
        self.writer.close()


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def answer(self, status: int, body: bytes) -> None:
        if status == 202:
            self.ok += 1
        else:
            self._error(f"HTTP {status}", body.decode(errors="replace")[:200])

    def failure(self, exc: BaseException) -> None:
        self._error(type(exc).__name__, str(exc)[:200])

    def _error(self, key: str, example: str) -> None:
        self.errors[key] += 1
        self.examples.setdefault(key, example)

    def report(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": dict(self.errors), "error_examples": self.examples}


async def burst(port: int, reqs: list[bytes], concurrency: int) -> tuple[float, Tally]:
    tally = Tally()
    pending = iter(reqs)

    async def sender(conn: Connection) -> None:
        for request in pending:
            try:
                tally.answer(*await conn.send(request))
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                tally.failure(exc)
                conn.close()
                conn = await Connection.open(port)
        conn.close()

    conns = [await Connection.open(port) for _ in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(sender(c) for c in conns))
    return len(reqs) / (time.perf_counter() - started), tally


async def steady(
    port: int, reqs: list[bytes], rate: float, connections: int, due_at: list[float] | None = None
) -> tuple[list[float], Tally, int]:
    """Open loop: request i is due at start + i/rate whatever became of the others. A request
    finding no idle connection opens one (counted in the latency, and reported). The latencies
    are in the requests' order; ``due_at``, if given, gets when each was due (``time.time()``)."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    latencies = [0.0] * len(reqs)
    # First in, first out: every connection is used every few hundred requests, so none sits
    # idle long enough for the server's keep-alive timeout (uvicorn: 5 s) to close it.
    idle = deque([await Connection.open(port) for _ in range(connections)])
    opened = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, request: bytes, due: float) -> None:
        nonlocal opened
        while idle and idle[0].reader.at_eof():
            idle.popleft().close()
        if idle:
            conn = idle.popleft()
        else:
            opened += 1
            conn = await Connection.open(port)
        try:
            tally.answer(*await conn.send(request))
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            tally.failure(exc)
            conn.close()
        else:
            idle.append(conn)
        latencies[i] = loop.time() - due

    start = loop.time() + 0.05
    if due_at is not None:
        wall = time.time() - loop.time()
        due_at[:] = [wall + start + i / rate for i in range(len(reqs))]
    for i, request in enumerate(reqs):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(i, request, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return latencies, tally, opened


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """uvloop for the load generator too when it is installed: it is less CPU per request."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def start_receiver(
    env: dict[str, str], port: int, log: Path, *, workers: int | None = None
) -> subprocess.Popen[bytes]:
    """``grassroots serve`` on ``port`` (``--workers`` if given) in a session of its own, once
    it accepts connections."""
    more = [] if workers is None else ["--workers", str(workers)]
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(BIN), "serve", "--port", str(port), *more],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for_port(port, timeout=60)
    return server


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children that have ended or are running."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15]) / ticks
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64, help="steady: connections ready")
    parser.add_argument("--server-workers", type=int, default=2, help="uvicorn processes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with ExitStack() as stack:
        database_url = stack.enter_context(throwaway_database(f"grbench_intake_{os.getpid()}"))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="grbench-")))
        redis_port = stack.enter_context(private_redis(tmp))
        result = measure(args, database_url, redis_port, tmp)
    print_report(result, as_json=args.json)


def wait_for_port(port: int, *, timeout: float) -> None:
    """Until the receiver takes connections on ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the receiver did not start")
        time.sleep(0.2)


def measure(
    args: argparse.Namespace, database_url: str, redis_port: int, tmp: Path
) -> dict[str, Any]:
    port = spare_port()
    secret = generate_secret()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "WEBHOOK_SECRETS": secret,
        "LOG_LEVEL": "WARNING",
    }
    server = None
    result: dict[str, Any] = {
        "server_workers": args.server_workers,
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        subprocess.run([str(BIN), "db", "upgrade"], env=env, check=True, capture_output=True)
        server = start_receiver(env, port, tmp / "serve.log", workers=args.server_workers)
        # Warm-up: every server process opens its database and broker connections.
        _, warm = run(lambda: burst(port, requests(secret, "warm", 500), args.concurrency))
        sent = 500

        reqs = requests(secret, "burst", args.burst)
        cpu = cpu_seconds(server.pid)
        rate, tally = run(lambda: burst(port, reqs, args.concurrency))
        sent += args.burst
        result.update(
            burst_events=args.burst,
            burst_concurrency=args.concurrency,
            burst_events_per_s=round(rate),
            burst_server_cpu_ms_per_event=round(
                1000 * (cpu_seconds(server.pid) - cpu) / args.burst, 3
            ),
            burst=tally.report(),
        )
        print(f"burst: {result['burst_events_per_s']} events/s", file=sys.stderr, flush=True)

        n = int(args.rate * args.seconds)
        reqs = requests(secret, "steady", n)
        latencies, tally, opened = run(lambda: steady(port, reqs, args.rate, args.connections))
        sent += n
        latencies.sort()
        result.update(
            steady_rate_per_s=args.rate,
            steady_events=n,
            p50_ms=round(1000 * statistics.median(latencies), 1),
            p99_ms=round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
            max_ms=round(1000 * latencies[-1], 1),
            steady_connections_opened=opened,
            steady=tally.report(),
        )
        # A graceful stop finishes the sends of answered events; then count what arrived.
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        with psycopg.connect(database_url) as conn:
            row = conn.execute("SELECT count(*) FROM roster_events").fetchone()
        queued = redis.Redis(port=redis_port).llen("events")
        result.update(
            events_sent=sent,
            events_stored=row[0] if row else 0,
            events_queued=queued,
            warmup=warm.report(),
        )
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    return result


if __name__ == "__main__":
    main()
