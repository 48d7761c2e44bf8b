#!/usr/bin/env python3
"""Benchmark: webhook intake of `grassroots serve` (verify, commit to the inbox, enqueue).

Starts a private redis-server and `grassroots serve` against a fresh Postgres database, then:
1. burst: N signed events as fast as C concurrent connections can send them -> events/s;
2. steady: events at a fixed rate (open loop, default 500/s) -> p50 / p99 latency.
No workers run: this measures the receiver alone. The load generator shares the machine.

    .venv/bin/python bench/intake.py [--burst 10000] [--rate 500] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from worker.signing import generate_secret, signed_headers

BIN = Path(sys.executable).parent / "grassroots"
ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def requests(secret: str, prefix: str, n: int) -> list[tuple[bytes, dict[str, str]]]:
    out = []
    for i in range(n):
        event = {
            "id": f"{prefix}-{i}",
            "type": "users.updated",
            "created": "2026-10-01T00:00:00Z",
            "data": {"object": {"id": f"{i:024x}", "district": "d" * 24, "roles": {"student": {}}}},
        }
        body = json.dumps(event).encode()
        out.append((body, {"content-type": "application/json", **signed_headers(secret, body)}))
    return out


async def burst(url: str, reqs: list[tuple[bytes, dict[str, str]]], concurrency: int) -> float:
    queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)

    async def sender(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body, headers = queue.get_nowait()
            response = await client.post(url, content=body, headers=headers)
            assert response.status_code == 202, response.text

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        started = time.perf_counter()
        await asyncio.gather(*(sender(client) for _ in range(concurrency)))
        return len(reqs) / (time.perf_counter() - started)


async def steady(url: str, reqs: list[tuple[bytes, dict[str, str]]], rate: float) -> list[float]:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one(body: bytes, headers: dict[str, str]) -> None:
            sent = time.perf_counter()
            response = await client.post(url, content=body, headers=headers)
            latencies.append(time.perf_counter() - sent)
            assert response.status_code == 202, response.text

        started = time.perf_counter()
        tasks = []
        for i, (body, headers) in enumerate(reqs):
            # Open loop: each request leaves on schedule whatever happened to the others.
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body, headers)))
        await asyncio.gather(*tasks)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--server-workers", type=int, default=2, help="uvicorn processes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    name = f"grbench_intake_{os.getpid()}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    tmp = Path(tempfile.mkdtemp(prefix="grbench-"))
    redis_port, port = spare_port(), spare_port()
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(redis_port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
    )
    secret = generate_secret()
    env = {
        **os.environ,
        "DATABASE_URL": ADMIN_URL.rsplit("/", 1)[0] + f"/{name}",
        "BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "WEBHOOK_SECRETS": secret,
        "LOG_LEVEL": "WARNING",
    }
    server = None
    result: dict[str, Any] = {"server_workers": args.server_workers}
    try:
        subprocess.run([str(BIN), "db", "upgrade"], env=env, check=True, capture_output=True)
        with (tmp / "serve.log").open("wb") as log:
            server = subprocess.Popen(
                [str(BIN), "serve", "--port", str(port), "--workers", str(args.server_workers)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the receiver did not start")
            time.sleep(0.2)
        url = f"{base}/webhooks/clever"
        asyncio.run(burst(url, requests(secret, "warm", 500), args.concurrency))
        result["burst_events"] = args.burst
        result["burst_events_per_s"] = round(
            asyncio.run(burst(url, requests(secret, "burst", args.burst), args.concurrency))
        )
        print(f"burst: {result['burst_events_per_s']} events/s", file=sys.stderr, flush=True)
        n = int(args.rate * args.seconds)
        latencies = sorted(asyncio.run(steady(url, requests(secret, "steady", n), args.rate)))
        result.update(
            {
                "steady_rate_per_s": args.rate,
                "steady_events": n,
                "p50_ms": round(1000 * statistics.median(latencies), 1),
                "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
                "max_ms": round(1000 * latencies[-1], 1),
            }
        )
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        redis.terminate()
        redis.wait()
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}  {value}")


if __name__ == "__main__":
    main()
