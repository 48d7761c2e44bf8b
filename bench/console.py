#!/usr/bin/env python3
"""Benchmark: every page of the operators' console (SPEC §5.9) over a big inbox.

A throwaway Postgres database gets the example district, then, set-based, ``--events`` inbox
rows (default a million, spread over 20 districts, four types, received a second apart) of
which ``--dead`` (default 10,000) are dead with an open dead letter each (five error classes),
200 held and 100 accepted, plus as many audit rows as dead letters. A real ``grassroots serve``
answers; a plain httpx client signs in as an operator made by ``grassroots operator add`` and
asks each page ``--requests`` times after a warm-up, one request at a time.

    target: every page's p95 under 100 ms

    .venv/bin/python -m bench.console                      # 1,000,000 events, 10,000 dead
    .venv/bin/python -m bench.console --events 100000      # a quick run
    .venv/bin/python -m bench.console --json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.common import BIN, ROOT, print_report, private_redis, spare_port, throwaway_database

TARGET_P95_MS = 100.0
EXAMPLE = ROOT / "worker" / "demo_data" / "example-isd.json"
EXAMPLE_DISTRICT = "5b2a6f0c8e9d7a0011223344"
EXAMPLE_STUDENT = "58c81dcea3627927150003ed"
TYPES = ["users.updated", "users.deleted", "sections.updated", "users.created"]
ERRORS = ["KeyError", "LockNotAvailable", "RaiseException", "ValueError", "TimeoutError"]


def fill(url: str, *, events: int, dead: int) -> None:
    """The inbox, dead letters and audit rows, in a few set-based statements."""
    every = max(events // dead, 1)
    types = "ARRAY[" + ", ".join(f"'{t}'" for t in TYPES) + "]"
    errors = "ARRAY[" + ", ".join(f"'{e}'" for e in ERRORS) + "]"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"""
            INSERT INTO roster_events (id, type, source, district_id, object_type, object_id,
                occurred_at, payload, status, attempts, brake_released, received_at, updated_at)
            SELECT 'bench-' || g, ({types})[g %% 4 + 1], 'webhook', 'district-' || (g %% 20),
                'user', 'user-' || g, now() - (%(n)s - g) * interval '1 second', '{{}}'::json,
                CASE WHEN g %% %(every)s = 0 AND g / %(every)s <= %(dead)s THEN 'dead'
                     WHEN g %% 5000 = 1 THEN 'held'
                     WHEN g > %(n)s - 100 THEN 'accepted'
                     ELSE 'done' END,
                1, false, now() - (%(n)s - g) * interval '1 second', now()
            FROM generate_series(1, %(n)s) AS g
            """.encode(),
            {"n": events, "every": every, "dead": dead},
        )
        conn.execute(
            f"""
            INSERT INTO dead_letters (event_id, task, args, reason, exception, error, traceback,
                attempts, first_failed_at, last_failed_at)
            SELECT id, 'grassroots.process_event', '{{}}'::json, 'retries_exhausted',
                ({errors})[abs(hashtext(id)) % 5 + 1], 'it broke', 'Traceback …', 9,
                received_at, received_at + interval '1 minute'
            FROM roster_events WHERE status = 'dead'
            """.encode()
        )
        conn.execute(
            """
            INSERT INTO audit_log (at, action, trigger, subject_type, subject_id, details)
            SELECT now() - g * interval '1 second', 'replay', 'operator:ada:console:replay',
                'event', 'bench-' || g, '{}'::json
            FROM generate_series(1, %(dead)s) AS g
            """,
            {"dead": dead},
        )
        # As autovacuum leaves a table in steady state: statistics, and the visibility map that
        # lets a count be answered from an index alone.
        conn.execute("VACUUM ANALYZE")


def measure(client: httpx.Client, path: str, requests: int) -> dict[str, float]:
    for _ in range(3):
        client.get(path).raise_for_status()
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
    times.sort()
    p95 = times[max(int(len(times) * 0.95) - 1, 0)]
    return {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(p95, 1)}


def pages(client: httpx.Client, events_total: int) -> list[str]:
    events = client.get("/console/events").text
    cursor = events.split('rel="next"')[0].rsplit('href="', 1)[1].split('"')[0]
    return [
        "/console/",
        "/console/events",
        cursor.replace("&amp;", "&"),
        "/console/events?status=dead",
        "/console/events?status=held",
        "/console/events?type=users.deleted",
        "/console/events?district=district-7",
        "/console/events?status=dead&type=users.updated&district=district-3",
        f"/console/events/bench-{events_total // 2}",
        "/console/dead",
        "/console/dead/confirm?task=grassroots.process_event&error=KeyError",
        "/console/held",
        "/console/pauses",
        f"/console/districts/{EXAMPLE_DISTRICT}",
        f"/console/accounts/{EXAMPLE_STUDENT}",
        "/console/audit",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"events": args.events, "dead": args.dead}
    with (
        tempfile.TemporaryDirectory() as tmp,
        private_redis(Path(tmp)) as redis_port,
        throwaway_database(f"grbench_console_{os.getpid()}") as url,
    ):
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        }

        def cli(*argv: str) -> str:
            return subprocess.run(
                [str(BIN), *argv], env=env, check=True, capture_output=True, text=True
            ).stdout

        cli("db", "upgrade")
        cli("seed", str(EXAMPLE))
        started = time.perf_counter()
        fill(url, events=args.events, dead=args.dead)
        result["fill_s"] = round(time.perf_counter() - started, 1)
        token = cli("operator", "add", "ada", "--role", "operator").strip()
        port = spare_port()
        server = subprocess.Popen(
            [str(BIN), "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=30) as client:
                for _ in range(300):
                    try:
                        if client.get("/healthz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        time.sleep(0.1)
                signed = client.post("/console/sign-in", data={"name": "ada", "token": token})
                if signed.status_code != 303:
                    raise SystemExit(f"sign-in failed: {signed.status_code}")
                slowest = 0.0
                for path in pages(client, args.events):
                    figures = measure(client, path, args.requests)
                    label = path if "before=" not in path else "/console/events (page 2)"
                    result[label] = (
                        f"p50 {figures['p50_ms']:6.1f} ms  p95 {figures['p95_ms']:6.1f} ms"
                    )
                    slowest = max(slowest, figures["p95_ms"])
                result["slowest_p95_ms"] = slowest
                result["target_met"] = slowest < TARGET_P95_MS
        finally:
            server.terminate()
            server.wait(30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--dead", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    print_report(result, as_json=args.json)
    sys.exit(0 if result["target_met"] else 1)


if __name__ == "__main__":
    main()
