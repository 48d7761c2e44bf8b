"""Benchmark: seed a synthetic district twice, then run its exit in-process.

Generates (and caches under ``bench/out/``) a district with ``bench/make_district.py``,
creates a throwaway database (Postgres by default, ``--sqlite`` for a SQLite file), runs the
migrations, then times:

  seed     ``tasks.roster.load_snapshot`` of the whole file, in one session scope
  reseed   the same file again: idempotency, so no table's row count may change
  exit     ``tasks.exits.run_in_process`` of the district, in one session scope

and reports wall seconds, rows per table, peak RSS and accounts per second. The database is
dropped at the end, whatever happens. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import re
import resource
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, inspect, select
from sqlalchemy.engine import Engine

from bench.common import ADMIN_URL, OUT, ROOT, district_file, throwaway_database
from models import Base
from tasks.exits import run_in_process
from tasks.roster import load_snapshot
from worker.db import make_engine, session_scope
from worker.migrate import upgrade


class BenchError(Exception):
    """The benchmark could not run, or found a behaviour it must not accept."""


@dataclass
class Phase:
    name: str
    seconds: float
    cpu_seconds: float
    accounts: int
    rows: dict[str, int]
    peak_rss_mib: float
    detail: dict[str, Any] = field(default_factory=dict)
    statements: list[dict[str, Any]] = field(default_factory=list)

    @property
    def accounts_per_second(self) -> float:
        return self.accounts / self.seconds if self.seconds else 0.0


def cpu_seconds() -> float:
    """User and system CPU time of this process so far: the client's share of a phase."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def bench_database(sqlite: bool, admin_url: str) -> Iterator[str]:
    """A fresh database for this run, migrated; dropped (or deleted) on the way out."""
    name = f"grbench_{os.getpid()}"
    if sqlite:
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / f"{name}.db"
        try:
            upgrade(f"sqlite:///{path}")
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    with throwaway_database(name, admin_url=admin_url) as url:
        upgrade(url)
        yield url


class StatementTimes:
    """Wall time the database took per statement shape (IN lists and whitespace collapsed),
    from the engine's cursor events: which SQL a phase waits on."""

    _IN_LIST = re.compile(r"IN \((?:[^()]|\([^()]*\))*\)")

    def __init__(self, engine: Engine) -> None:
        self.totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self._started: list[float] = []
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, *_: Any) -> None:
        self._started.append(time.perf_counter())

    def _after(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        elapsed = time.perf_counter() - self._started.pop()
        shape = self._IN_LIST.sub("IN (…)", " ".join(statement.split()))
        total = self.totals[shape[:160]]
        total[0] += elapsed
        total[1] += 1

    def take(self, top: int = 10) -> list[dict[str, Any]]:
        ranked = sorted(self.totals.items(), key=lambda item: -item[1][0])[:top]
        self.totals.clear()
        return [
            {"statement": shape, "seconds": round(secs, 3), "calls": int(calls)}
            for shape, (secs, calls) in ranked
        ]


def row_counts(engine: Engine) -> dict[str, int]:
    """Rows per table of the models that the migrations have made."""
    made = set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        return {
            table.name: int(conn.scalar(select(func.count()).select_from(table)) or 0)
            for table in Base.metadata.sorted_tables
            if table.name in made
        }


def timed(
    name: str,
    engine: Engine,
    work: Callable[[], tuple[int, dict[str, Any]]],
    profile_dir: Path | None,
    statements: StatementTimes | None,
) -> Phase:
    gc.collect()
    profiler = cProfile.Profile() if profile_dir else None
    start, cpu_start = time.perf_counter(), cpu_seconds()
    if profiler:
        profiler.enable()
    accounts, detail = work()
    if profiler:
        profiler.disable()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    if profiler and profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(profile_dir / f"{name}.prof")
    taken = statements.take() if statements else []
    return Phase(name, seconds, cpu, accounts, row_counts(engine), peak_rss_mib(), detail, taken)


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = district_file(args.students, args.teachers)
    start = time.perf_counter()
    data: dict[str, Any] = json.loads(path.read_bytes())
    read_seconds = time.perf_counter() - start
    district_id: str = data["districts"][0]["id"]
    profile_dir = OUT / "profiles" if args.profile else None
    phases: list[Phase] = []
    analyze_seconds: float | None = None

    with bench_database(args.sqlite, args.postgres_url) as url:
        engine = make_engine(url)
        statements = StatementTimes(engine) if args.sql_timing else None
        try:

            def seed() -> tuple[int, dict[str, Any]]:
                with session_scope(engine) as session:
                    result = load_snapshot(session, data).as_dict()
                return result["users"] + result["accounts"], result

            def district_exit() -> tuple[int, dict[str, Any]]:
                with session_scope(engine) as session:
                    outcome = run_in_process(session, district_id, trigger="bench").as_dict()
                return outcome["converted"], outcome

            phases.append(timed("seed", engine, seed, profile_dir, statements))
            phases.append(timed("reseed", engine, seed, profile_dir, statements))
            if phases[1].rows != phases[0].rows:
                changed = {
                    t: (n, phases[1].rows[t])
                    for t, n in phases[0].rows.items()
                    if phases[1].rows[t] != n
                }
                raise BenchError(f"second seed changed row counts: {changed}")
            if args.analyze:
                start = time.perf_counter()
                with engine.begin() as conn:
                    conn.exec_driver_sql("ANALYZE")
                analyze_seconds = round(time.perf_counter() - start, 3)
            if not args.no_exit:
                phases.append(timed("exit", engine, district_exit, profile_dir, statements))
        finally:
            engine.dispose()

    return {
        "backend": "sqlite" if args.sqlite else "postgresql",
        "file": str(path.relative_to(ROOT)),
        "file_mib": round(path.stat().st_size / 2**20, 1),
        "students": args.students,
        "teachers": args.teachers,
        "json_load_seconds": round(read_seconds, 3),
        "analyze_seconds": analyze_seconds,
        "phases": [
            {
                **{k: v for k, v in asdict(p).items() if k != "peak_rss_mib"},
                "seconds": round(p.seconds, 3),
                "cpu_seconds": round(p.cpu_seconds, 3),
                "accounts_per_second": round(p.accounts_per_second, 1),
                "peak_rss_mib": round(p.peak_rss_mib, 1),
            }
            for p in phases
        ],
        "profiles": str(profile_dir.relative_to(ROOT)) if profile_dir else None,
    }


def print_table(report: dict[str, Any]) -> None:
    phases = report["phases"]
    print(
        f"{report['backend']}: {report['file']} ({report['file_mib']} MiB,"
        f" JSON load {report['json_load_seconds']:.2f} s)"
    )
    if report["analyze_seconds"] is not None:
        print(f"ANALYZE before the exit: {report['analyze_seconds']:.2f} s")
    print(
        f"{'phase':<8} {'seconds':>9} {'client CPU':>11} {'accounts':>9} {'accounts/s':>11}"
        f" {'peak RSS MiB':>13}"
    )
    for p in phases:
        print(
            f"{p['name']:<8} {p['seconds']:>9.2f} {p['cpu_seconds']:>11.2f} {p['accounts']:>9}"
            f" {p['accounts_per_second']:>11.0f} {p['peak_rss_mib']:>13.0f}"
        )
    print()
    tables = list(phases[0]["rows"])
    print(f"{'rows':<20}" + "".join(f"{p['name']:>10}" for p in phases))
    for table in tables:
        print(f"{table:<20}" + "".join(f"{p['rows'][table]:>10}" for p in phases))
    for p in phases:
        if p["statements"]:
            print(f"\nslowest statements, {p['name']}:")
            for st in p["statements"]:
                print(f"{st['seconds']:>9.2f} s {st['calls']:>7}x  {st['statement'][:100]}")
    if report["profiles"]:
        print(f"\nprofiles: {report['profiles']}/<phase>.prof")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--students", type=int, default=100_000)
    p.add_argument("--teachers", type=int, default=4_000)
    p.add_argument("--sqlite", action="store_true", help="run against a SQLite file, not Postgres")
    p.add_argument(
        "--postgres-url",
        default=ADMIN_URL,
        help="an admin connection the bench database is created from (env BENCH_POSTGRES_URL)",
    )
    p.add_argument("--no-exit", action="store_true", help="only time the two seeds")
    p.add_argument(
        "--analyze",
        action="store_true",
        help="ANALYZE between the seeds and the exit (what autovacuum would have done)",
    )
    p.add_argument(
        "--profile", action="store_true", help="write cProfile stats per phase to bench/out"
    )
    p.add_argument(
        "--sql-timing", action="store_true", help="report the statements each phase waited on"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A plain kill still unwinds, so the bench database is dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
