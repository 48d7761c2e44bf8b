#!/usr/bin/env python3
"""Benchmark: a whole district exit through the real pipeline.

Seeds a synthetic district (bench/make_district.py) into a fresh Postgres database, starts
a private redis-server and `grassroots worker` processes, starts the exit with
`grassroots district exit ID`, and times it until the exit is done. Reports accounts/s, the time
of each phase (teacher units, account batches, the finish step) and the peak memory of each worker
process tree: PSS (shared pages split among their sharers), the RSS sum, and the largest RSS.

    .venv/bin/python -m bench.exit_pipeline                       # the 100,000-student district
    .venv/bin/python -m bench.exit_pipeline --students 5000 --teachers 200
    .venv/bin/python -m bench.exit_pipeline --template grperf     # copy a database seeded before
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from bench.common import BIN, CELERY, district_file, print_report, private_redis, throwaway_database


def _processes() -> Iterator[tuple[int, str, list[str]]]:
    """Each live process: its pid, command name and the fields of /proc/PID/stat after it."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        head, _, tail = stat.rpartition(")")
        yield int(entry), head.partition("(")[2], tail.split()


def _family(pid: int) -> set[int]:
    """A process and all its descendants."""
    parents = {child: int(fields[1]) for child, _, fields in _processes()}
    family = {pid}
    changed = True
    while changed:
        changed = False
        for child, parent in parents.items():
            if parent in family and child not in family:
                family.add(child)
                changed = True
    return family


def _memory_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(pid: int) -> dict[str, int]:
    """Bytes of a worker's process tree: the sum of its processes' RSS (which counts the pages
    the forked pool children share with their parent once per process), their PSS (which
    splits each shared page among its sharers: what the tree really holds), and the largest
    single RSS."""
    family = _family(pid)
    rss = [_memory_kb(p, "Rss") * 1024 for p in family]
    return {
        "rss_sum": sum(rss),
        "pss_sum": sum(_memory_kb(p, "Pss") * 1024 for p in family),
        "rss_max": max(rss, default=0),
    }


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by the live processes, summed per command name:
    where the machine's two cores went during the exit (postgres, redis-server, the workers)."""
    ticks: dict[str, int] = {}
    for _, name, fields in _processes():
        ticks[name] = ticks.get(name, 0) + int(fields[11]) + int(fields[12])
    hz = os.sysconf("SC_CLK_TCK")
    return {name: t / hz for name, t in ticks.items()}


CHECKPOINTS = "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter"


def wait_for_workers(
    env: dict[str, str], count: int, workers: list[subprocess.Popen[bytes]]
) -> None:
    """Until ``count`` workers answer a Celery ping (``celery inspect ping``)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(w.poll() is not None for w in workers):
            raise SystemExit("a worker died while starting")
        ping = subprocess.run(
            [str(CELERY), "-A", "worker.celery_app", "inspect", "ping", "--timeout", "1"],
            env=env,
            capture_output=True,
            text=True,
        )
        if ping.stdout.count("pong") >= count:
            return
    raise SystemExit(f"{count} worker(s) did not answer within 120 s")


class Sampler(threading.Thread):
    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak: dict[int, dict[str, int]] = {pid: {} for pid in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in self.pids:
                for key, value in tree_memory(pid).items():
                    self.peak[pid][key] = max(self.peak[pid].get(key, 0), value)
            self.stop.wait(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--students", type=int, default=100_000)
    parser.add_argument("--teachers", type=int, default=4_000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (main + pool)")
    parser.add_argument("--concurrency", type=int, default=2, help="pool size of each worker")
    parser.add_argument(
        "--template",
        metavar="DATABASE",
        help="copy this already seeded database (CREATE DATABASE … TEMPLATE) instead of seeding",
    )
    parser.add_argument(
        "--no-vacuum",
        action="store_true",
        help="time the exit right after the bulk load, without the VACUUM autovacuum would make",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    roster = district_file(args.students, args.teachers)
    with ExitStack() as stack:
        url = stack.enter_context(
            throwaway_database(f"grbench_exit_{os.getpid()}", template=args.template)
        )
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="grbench-")))
        redis_port = stack.enter_context(private_redis(tmp))
        result = measure(args, roster, url, redis_port, tmp)
    print_report(result, as_json=args.json)


def measure(
    args: argparse.Namespace, roster: Path, url: str, redis_port: int, tmp: Path
) -> dict[str, Any]:
    district_id = json.loads(roster.read_text())["districts"][0]["id"]
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
    }
    workers: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {
        "students": args.students,
        "teachers": args.teachers,
        "workers": args.workers,
        "concurrency": args.concurrency,
    }
    try:
        prepare(args, roster, url, district_id, env, result)
        start_workers(args, env, tmp, workers)
        # Start the clock once every worker answers (a worker's start-up is not the exit's
        # time), and with no checkpoint owed: the seed's (or the copy's) writes would otherwise
        # be flushed in the middle of the timed exit. A district exits long after it was loaded,
        # when autovacuum has long since been through its tables (it is off on the test machine
        # this was written on): VACUUM stands in for it, unless --no-vacuum.
        wait_for_workers(env, args.workers, workers)
        wal_before, checkpoints_before = settle(url, vacuum=not args.no_vacuum)
        result["vacuumed"] = not args.no_vacuum
        sampler = Sampler([w.pid for w in workers])
        sampler.start()
        cpu_before = cpu_seconds()
        started, clock = time.monotonic(), datetime.now(UTC)
        subprocess.run(
            [str(BIN), "district", "exit", district_id], env=env, check=True, capture_output=True
        )
        with psycopg.connect(url, autocommit=True) as conn:
            units = wait_until_done(conn, district_id, workers, tmp)
            elapsed = time.monotonic() - started
            cpu_after = cpu_seconds()
            wal = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", wal_before
            ).fetchone()
            checkpoints = conn.execute(CHECKPOINTS).fetchone()
            left = conn.execute(
                "SELECT count(*) FROM accounts WHERE district_id = %s", (district_id,)
            ).fetchone()
            phases = exit_phases(conn, district_id, clock)
        sampler.stop.set()
        sampler.join()
        assert left == (0,), f"{left} accounts left in the district"
        result.update(
            {
                "exit_s": round(elapsed, 2),
                "units": units,
                **{k: round(v.total_seconds(), 2) for k, v in phases.items()},
                "accounts_per_s": round(result["accounts"] / elapsed),
                # Write-ahead log written during the exit, and checkpoints begun meanwhile.
                "wal_mb": round(float(wal[0]) / 2**20) if wal else None,
                "checkpoints": checkpoints[0] - checkpoints_before[0]
                if checkpoints and checkpoints_before
                else None,
                "cpu_s": cpu_used(cpu_before, cpu_after),
                **{
                    f"peak_worker_{key}_mb": [
                        round(p.get(key, 0) / 2**20) for p in sampler.peak.values()
                    ]
                    for key in ("pss_sum", "rss_sum", "rss_max")
                },
            }
        )
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait()
    return result


def prepare(
    args: argparse.Namespace,
    roster: Path,
    url: str,
    district_id: str,
    env: dict[str, str],
    result: dict[str, Any],
) -> None:
    """The schema, the district seeded (unless copied from ``--template``), its accounts."""
    subprocess.run([str(BIN), "db", "upgrade"], env=env, check=True, capture_output=True)
    if not args.template:
        started = time.monotonic()
        subprocess.run([str(BIN), "seed", str(roster)], env=env, check=True, capture_output=True)
        result["seed_s"] = round(time.monotonic() - started, 1)
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM accounts WHERE district_id = %s", (district_id,)
        ).fetchone()
        assert row is not None
        result["accounts"] = int(row[0])


def settle(url: str, *, vacuum: bool) -> tuple[Any, Any]:
    """VACUUM ANALYZE (unless not ``vacuum``) and a checkpoint; where the WAL and the checkpoint
    count stand then."""
    with psycopg.connect(url, autocommit=True) as conn:
        if vacuum:
            conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
        wal_before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        checkpoints_before = conn.execute(CHECKPOINTS).fetchone()
    return wal_before, checkpoints_before


def start_workers(
    args: argparse.Namespace,
    env: dict[str, str],
    tmp: Path,
    workers: list[subprocess.Popen[bytes]],
) -> None:
    """Each into ``workers`` as it starts: the caller stops every one that did."""
    for n in range(args.workers):
        with (tmp / f"worker{n}.log").open("wb") as log:
            workers.append(
                subprocess.Popen(
                    [
                        str(BIN),
                        "worker",
                        "--concurrency",
                        str(args.concurrency),
                        "-l",
                        os.environ.get("BENCH_WORKER_LOGLEVEL", "warning"),
                    ],
                    env=env,
                    cwd=tmp,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )


def wait_until_done(
    conn: psycopg.Connection[Any],
    district_id: str,
    workers: list[subprocess.Popen[bytes]],
    tmp: Path,
) -> int:
    """Until the district's exit is done; its number of units."""
    while True:
        row = conn.execute(
            "SELECT status, units_done, units_total FROM district_exits"
            " WHERE district_id = %s ORDER BY id DESC LIMIT 1",
            (district_id,),
        ).fetchone()
        if row is not None and row[0] == "done":
            return int(row[2])
        if any(w.poll() is not None for w in workers):
            raise SystemExit("a worker died: see " + str(tmp))
        time.sleep(0.2)


def exit_phases(
    conn: psycopg.Connection[Any], district_id: str, clock: datetime
) -> dict[str, timedelta]:
    """Where the time went: the exit's start, each phase's last unit, the finish step."""
    marks = conn.execute(
        "SELECT e.started_at,"
        " max(u.finished_at) FILTER (WHERE u.kind = 'teacher'),"
        " max(u.finished_at) FILTER (WHERE u.kind = 'accounts'), e.finished_at"
        " FROM district_exits e JOIN exit_units u ON u.exit_id = e.id"
        " WHERE e.district_id = %s GROUP BY e.id ORDER BY e.id DESC LIMIT 1",
        (district_id,),
    ).fetchone()
    assert marks is not None
    return {
        # The command's start, its task's way to a worker, the exit's first transaction.
        "start_s": marks[0] - clock,
        "teacher_units_s": marks[1] - marks[0],
        "account_batches_s": marks[2] - marks[1],
        "finish_s": marks[3] - marks[2],
    }


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process used meanwhile, most first; processes that ended meanwhile (the
    CLI that started the exit) are not counted."""
    return {
        name: round(used, 1)
        for name, used in sorted(
            ((n, after[n] - before.get(n, 0.0)) for n in after), key=lambda item: -item[1]
        )
        if used >= 0.1
    }


if __name__ == "__main__":
    main()
