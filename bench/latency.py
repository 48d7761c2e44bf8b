#!/usr/bin/env python3
"""Benchmark: one event's latency, a signed `users.deleted` webhook to its account converted.

Seeds a synthetic district (default 2,000 students) into a fresh Postgres database, starts a
private redis-server, `grassroots serve` (the real receiver) and one `grassroots worker` (pool of
2), then sends one signed `users.deleted` webhook per student at a steady rate (open loop,
default 20/s for 60 s: `bench/intake.py`'s sender), each for a different student. Once every
event is final it checks that each of their accounts was converted, and reports, per event:

  total          webhook due to leave -> the task that converted its account returned
  receiver       webhook due to leave -> the receiver's 202 (measured by the sender)
  to_worker      the inbox row's `received_at` -> the worker's main process took the message
  to_task        the worker took the message -> its task started in a pool process
  queue_wait     `received_at` -> the task started (to_worker + to_task)
  task           the task's run time, as Celery measures it

with p50/p90/p99/max of each. Where each comes from: `received_at` is the inbox row's
(`roster_events`, stamped by the receiver before its commit); the row's `task_id` names the Celery
task whose attempt was counted; the worker runs at log level INFO, where Celery logs, as JSON lines
with a timestamp (`worker/logs.py`), `Task … received` (main process) and `Task … succeeded in Ts`
(the pool process, after the task's commit): the task ended at that line's time and started T
before it. Nothing is added to the product for this; INFO logging costs the worker three lines
per event.

    .venv/bin/python -m bench.latency                          # 2,000 students, 20/s for 60 s
    .venv/bin/python -m bench.latency --rate 50 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    BIN,
    district_file,
    district_parser,
    print_report,
    private_redis,
    spare_port,
    start_worker,
    stop,
    throwaway_database,
    wait_for_workers,
)
from bench.intake import run, signed_request, start_receiver, steady
from models import AccountKind, EventStatus
from worker.signing import generate_secret

TASK_LINE = re.compile(
    r"Task grassroots\.process_event\[([\w-]+)\] (received|succeeded in ([\d.e-]+)s)"
)
WARMUP = 20  # events sent and awaited before the measured ones: every process connects first


def main() -> None:
    parser = district_parser(__doc__, students=2_000, teachers=80)
    parser.add_argument("--rate", type=float, default=20, help="events per second")
    parser.add_argument("--seconds", type=float, default=60, help="how long to send for")
    parser.add_argument("--concurrency", type=int, default=2, help="the worker's pool size")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    args = parser.parse_args()

    roster = district_file(args.students, args.teachers)
    students = [u for u in json.loads(roster.read_text())["users"] if "student" in u["roles"]]
    count = int(args.rate * args.seconds)
    if count + WARMUP > len(students):
        parser.error(f"{count} events and {WARMUP} to warm up need as many students")
    with ExitStack() as stack:
        url = stack.enter_context(throwaway_database(f"grbench_latency_{os.getpid()}"))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="grbench-")))
        redis_port = stack.enter_context(private_redis(tmp))
        result = measure(args, roster, students[: WARMUP + count], url, redis_port, tmp)
    print_report(result, as_json=args.json)


def removal(student: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "id": f"latency-{n}-{student['id']}",
        "type": "users.deleted",
        "created": (datetime.now(UTC) - timedelta(seconds=1)).isoformat(),
        "data": {
            "object": {
                "id": student["id"],
                "district": student["district"],
                "roles": {"student": {}},
            }
        },
    }


def measure(
    args: argparse.Namespace,
    roster: Path,
    students: list[dict[str, Any]],
    url: str,
    redis_port: int,
    tmp: Path,
) -> dict[str, Any]:
    port, secret = spare_port(), generate_secret()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "WEBHOOK_SECRETS": secret,
        # The removals of a minute are most of the district: no brake may hold them.
        "REMOVAL_BRAKE_PERCENT": "100",
        "LOG_LEVEL": "INFO",
        "BENCH_WORKER_LOGLEVEL": "info",
    }
    subprocess.run([str(BIN), "db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run([str(BIN), "seed", str(roster)], env=env, check=True, capture_output=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    log = tmp / "worker.log"
    worker = start_worker(env, log, concurrency=args.concurrency)
    server = None
    try:
        server = start_receiver({**env, "LOG_LEVEL": "WARNING"}, port, tmp / "serve.log")
        wait_for_workers(env, 1, [worker])
        warm = [signed_request(secret, removal(s, n)) for n, s in enumerate(students[:WARMUP])]
        run(lambda: steady(port, warm, args.rate, args.connections))
        wait_final(url, WARMUP, worker)
        events = [removal(s, n) for n, s in enumerate(students[WARMUP:], start=WARMUP)]
        reqs = [signed_request(secret, e) for e in events]
        due_at: list[float] = []
        answered, tally, opened = run(
            lambda: steady(port, reqs, args.rate, args.connections, due_at)
        )
        wait_final(url, len(students), worker)
    finally:
        if server is not None:
            stop(server)
        stop(worker)
    spans, problems = breakdown(url, events, due_at, answered, task_times(log))
    return {
        "students": args.students,
        "rate_per_s": args.rate,
        "events": len(events),
        "answered_202": tally.ok,
        "connections_opened": opened,
        "converted": len(spans["total"]),
        "problems": problems[:10],
        **{name: percentiles(values) for name, values in spans.items()},
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def breakdown(
    url: str,
    events: list[dict[str, Any]],
    due_at: list[float],
    answered: list[float],
    tasks: dict[str, dict[str, float]],
) -> tuple[dict[str, list[float]], list[str]]:
    """Each span (``SPANS``, seconds) of every event whose account was converted, and what went
    wrong with the others."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT e.id, e.status, e.received_at, e.task_id, a.kind FROM roster_events e"
            " LEFT JOIN accounts a ON a.id = e.object_id WHERE e.id = ANY(%s)",
            ([e["id"] for e in events],),
        ).fetchall()
    by_id = {row[0]: row for row in rows}
    spans: dict[str, list[float]] = {k: [] for k in SPANS}
    problems: list[str] = []
    for event, due, receiver in zip(events, due_at, answered, strict=True):
        row = by_id.get(event["id"])
        if row is None or row[1] != EventStatus.DONE or row[4] != AccountKind.GRASSROOTS:
            problems.append(f"{event['id']}: {(row[1], row[4]) if row else 'not stored'}")
            continue
        seen = tasks.get(row[3], {})
        if "ended" not in seen or "received" not in seen:
            problems.append(f"{event['id']}: its task {row[3]} is not in the worker's log")
            continue
        received = row[2].timestamp()
        started = seen["ended"] - seen["run"]
        for name, value in {
            "total": seen["ended"] - due,
            "receiver": receiver,
            "to_worker": seen["received"] - received,
            "to_task": started - seen["received"],
            "queue_wait": started - received,
            "task": seen["run"],
        }.items():
            spans[name].append(value)
    return spans, problems


SPANS = ("total", "receiver", "to_worker", "to_task", "queue_wait", "task")


def percentiles(values: list[float]) -> dict[str, float] | None:
    """p50, p90, p99 and max of ``values`` (seconds), in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    at = {f"p{q}": ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] for q in (90, 99)}
    return {
        name: round(1000 * v, 1)
        for name, v in {"p50": statistics.median(ordered), **at, "max": ordered[-1]}.items()
    }


def wait_final(url: str, count: int, worker: subprocess.Popen[bytes]) -> None:
    """Until ``count`` events are in the inbox and none of them is still open."""
    deadline = time.monotonic() + 300
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = ANY(%s)) FROM roster_events",
                ([EventStatus.ACCEPTED, EventStatus.PROCESSING],),
            ).fetchone()
            if row is not None and row[0] >= count and row[1] == 0:
                return
            if worker.poll() is not None:
                raise SystemExit("the worker died")
            time.sleep(0.2)
    raise SystemExit(f"{count} events were not final within 300 s")


def task_times(log: Path) -> dict[str, dict[str, float]]:
    """Per Celery task id: when the worker took it (``received``), when it ended (``ended``) and
    how long it ran (``run``), from the worker's JSON log lines."""
    out: dict[str, dict[str, float]] = {}
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        found = TASK_LINE.search(str(record.get("msg", "")))
        if found is None:
            continue
        at = datetime.fromisoformat(record["ts"]).timestamp()
        times = out.setdefault(found[1], {})
        if found[3] is None:
            times["received"] = at
        else:
            times.update(ended=at, run=float(found[3]))
    return out


if __name__ == "__main__":
    main()
