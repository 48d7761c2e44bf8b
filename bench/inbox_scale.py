#!/usr/bin/env python3
"""Benchmark: what an operator's reads cost as the inbox's history grows.

Fills a fresh Postgres database with an inbox of events received over 90 days, nearly all of
them final (done, ignored, stale, rejected, discarded), and a backlog that stays the same size
whatever the history: 100 accepted, 10 processing, 50 held, 20 deferred, and ``--dead`` dead
events (1,000; each with its open dead letter) spread over the first size's events. Then, at
each size of ``--events`` (the inbox grows from one to the next), times:

- ``status``: ``grassroots status`` / ``GET /ops/status`` without the broker
  (``worker.pipeline.pipeline_status``), the median of ``--repeat`` runs;
- ``metrics``: the database part of a ``/metrics`` scrape (``PipelineCollector``, uncached);
- ``replay_dead``: ``events replay --status dead`` itself at the largest size only (it changes
  the inbox: every dead event goes round again), through a private redis-server.

    .venv/bin/python -m bench.inbox_scale [--events 100000,1000000] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from bench.common import ADMIN_URL, print_report, private_redis, throwaway_database

DAYS = 90
DISTRICTS = 20
# Received over the last 90 days: row g of n at now - 90 days * (n - g) / n.
FILL = """
INSERT INTO roster_events (id, type, source, district_id, object_type, object_id, occurred_at,
    payload, status, attempts, brake_released, received_at, updated_at)
SELECT 'evt-' || g,
       (ARRAY['users.updated', 'users.deleted', 'sections.updated', 'users.created'])[1 + g %% 4],
       'webhook', 'd' || (g %% {districts}), 'user', 'u' || (g %% 200000),
       at, json_build_object('id', 'evt-' || g, 'type', 'users.updated', 'created', at,
           'data', json_build_object('object', json_build_object(
               'id', 'u' || (g %% 200000), 'district', 'd' || (g %% {districts}),
               'name', json_build_object('first', 'Student', 'last', 'Number ' || g)))),
       CASE WHEN g <= {dead_upto} AND g %% {dead_every} = 0 THEN 'dead'
            WHEN g %% 100 < 80 THEN 'done' WHEN g %% 100 < 90 THEN 'ignored'
            WHEN g %% 100 < 95 THEN 'stale' WHEN g %% 100 < 98 THEN 'rejected'
            ELSE 'discarded' END,
       1, false, at, at
FROM (SELECT g, now() - interval '{days} days' * ({top} - g) / {top} AS at
      FROM generate_series(%(first)s::int, %(last)s::int) AS g) AS rows
"""
DEAD_LETTERS = """
INSERT INTO dead_letters (event_id, task, subject, args, reason, exception, error, attempts,
    first_failed_at, last_failed_at)
SELECT id, 'grassroots.process_event', id, json_build_object('event_id', id), 'retries_exhausted',
       'LockNotAvailable', 'canceling statement due to lock timeout', 9, received_at, received_at
FROM roster_events WHERE status = 'dead' AND id NOT IN (SELECT event_id FROM dead_letters
    WHERE event_id IS NOT NULL)
"""
# The open backlog, the same at every size: the newest events still in flight or waiting.
BACKLOG = {"accepted": 100, "processing": 10, "held": 50, "deferred": 20}
SYNCS = """
INSERT INTO roster_syncs (id, district_id, status, dry_run, trigger, pulled_users,
    pulled_sections, changes, held, started_at, finished_at)
SELECT 's' || d || '-' || day, 'd' || d, CASE WHEN day %% 30 = 0 THEN 'failed' ELSE 'done' END,
       false, 'beat', 5000, 200, '{}'::json, 0, now() - interval '1 day' * day,
       now() - interval '1 day' * day + interval '2 minutes'
FROM generate_series(0, %(districts)s - 1) AS d, generate_series(1, 365) AS day
"""


def fill(url: str, first: int, last: int, *, top: int, dead_upto: int, dead: int) -> float:
    """Events ``first``..``last`` of an inbox that will hold ``top``, ``dead`` of them dead among
    the first ``dead_upto``; seconds taken."""
    started = time.perf_counter()
    every = max(1, dead_upto // dead)
    sql = FILL.format(
        districts=DISTRICTS, dead_every=every, dead_upto=dead_upto, days=DAYS, top=top
    )
    with psycopg.connect(url, autocommit=True) as conn:
        step = 200_000
        for start in range(first, last + 1, step):
            conn.execute(sql.encode(), {"first": start, "last": min(last, start + step - 1)})
        conn.execute(DEAD_LETTERS)
        for status in BACKLOG:
            conn.execute("UPDATE roster_events SET status = 'done' WHERE status = %s", (status,))
        newest = conn.execute(
            "SELECT id FROM roster_events WHERE status = 'done' ORDER BY received_at DESC LIMIT %s",
            (sum(BACKLOG.values()),),
        ).fetchall()
        ids = iter(row[0] for row in newest)
        for status, n in BACKLOG.items():
            chosen = [next(ids) for _ in range(n)]
            conn.execute(
                "UPDATE roster_events SET status = %s WHERE id = ANY(%s)", (status, chosen)
            )
        # As autovacuum leaves a table that has settled: statistics and visibility map current.
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def timed(fn: Callable[[], Any], repeat: int) -> float:
    """The median wall seconds of ``repeat`` runs, after one to warm the caches."""
    fn()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def measure(repeat: int) -> dict[str, float]:
    from worker.db import session_scope
    from worker.metrics import PipelineCollector
    from worker.pipeline import pipeline_status

    def status() -> None:
        with session_scope() as session:
            pipeline_status(session, with_broker=False)

    def metrics() -> None:
        list(PipelineCollector(cache_seconds=0)._database())

    return {
        "status_ms": round(timed(status, repeat) * 1000, 1),
        "metrics_db_ms": round(timed(metrics, repeat) * 1000, 1),
    }


def replay_all() -> dict[str, Any]:
    from worker import services

    started = time.perf_counter()
    result = services.replay_dead(by="bench")
    return {
        "replayed": len(result.replayed),
        "replay_dead_s": round(time.perf_counter() - started, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", default="100000,1000000", help="inbox sizes, growing")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dead", type=int, default=1000, help="dead events, at every size")
    parser.add_argument("--postgres-url", default=ADMIN_URL)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [int(n) for n in args.events.split(",")]
    top = sizes[-1]
    result: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        private_redis(Path(tmp)) as redis_port,
        throwaway_database(f"grbench_scale_{os.getpid()}", admin_url=args.postgres_url) as url,
    ):
        os.environ["DATABASE_URL"] = url
        os.environ["BROKER_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        from worker.migrate import upgrade

        upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SYNCS.encode(), {"districts": DISTRICTS})
        done = 0
        for size in sizes:
            fill_s = fill(url, done + 1, size, top=top, dead_upto=sizes[0], dead=args.dead)
            done = size
            result[f"{size}"] = {"fill_s": round(fill_s, 1), **measure(args.repeat)}
        result[f"{top}"].update(replay_all())
    print_report(result, as_json=args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
