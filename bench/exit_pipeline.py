#!/usr/bin/env python3
"""Benchmark: a whole district exit through the real pipeline, beside its floor.

Seeds a synthetic district (bench/make_district.py) into a Postgres database once, starts a
private redis-server, then ``--runs`` times (default 3), alternating:

- the exit: a fresh copy of the seeded database, fresh `grassroots worker` processes, the exit
  started with `grassroots district exit ID` and timed until it is done. Reports accounts/s,
  the time of each phase (start, teacher units, account batches, finish step) and the peak
  memory of each worker process tree: PSS (shared pages split among their sharers), the RSS
  sum, and the largest RSS;
- its floor (bench/floors.py), on another fresh copy: as many no-op Celery tasks as the exit had
  teacher units, on a worker with the exit's settings, and the same account batches converted
  by the same functions without Celery (and, beside them, the teacher units without Celery).

It ends with each phase's median, its floor's, and their ratio; then the teacher units' own
time without Celery against the time the target ratio leaves them.

    .venv/bin/python -m bench.exit_pipeline                       # the 100,000-student district
    .venv/bin/python -m bench.exit_pipeline --students 5000 --teachers 200 --runs 1
    .venv/bin/python -m bench.exit_pipeline --template grperf     # copy a database seeded before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    BIN,
    ROOT,
    district_file,
    district_parser,
    print_report,
    private_redis,
    start_worker,
    stop,
    throwaway_database,
    wait_for_workers,
)


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


# The phases that have a floor, and the floor's name in a run's report.
FLOORED = {"teacher_units_s": "noop_tasks_s", "account_batches_s": "batches_in_process_s"}
# The teacher units' own work without Celery (``floors.py convert``): not a floor of the phase,
# which pays it on the same cores as Celery's per-task work, but what the phase holds beyond it.
UNITS_ALONE = "teacher_units_in_process_s"
# The ratio issue 25 asks the exit to stay within.
TARGET_RATIO = 1.25


def main() -> None:
    parser = district_parser(__doc__, students=100_000, teachers=4_000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (main + pool)")
    parser.add_argument("--concurrency", type=int, default=2, help="pool size of each worker")
    parser.add_argument("--runs", type=int, default=3, help="exits, each followed by its floor")
    parser.add_argument("--no-floor", action="store_true", help="time the exit only")
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
    args = parser.parse_args()

    roster = district_file(args.students, args.teachers)
    district_id = json.loads(roster.read_text())["districts"][0]["id"]
    result: dict[str, Any] = {
        "students": args.students,
        "teachers": args.teachers,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "vacuumed": not args.no_vacuum,
    }
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="grbench-")))
        redis_port = stack.enter_context(private_redis(tmp))
        template = args.template
        if template is None:
            template = f"grbench_exit_{os.getpid()}_seed"
            url = stack.enter_context(throwaway_database(template))
            result["seed_s"] = seed(url, roster, redis_port)
        for n in range(args.runs):
            with throwaway_database(f"grbench_exit_{os.getpid()}_{n}", template=template) as url:
                run = measure(args, district_id, url, redis_port, tmp)
            if not args.no_floor:
                with throwaway_database(
                    f"grbench_floor_{os.getpid()}_{n}", template=template
                ) as url:
                    run.update(measure_floor(args, district_id, url, redis_port, tmp, run))
            print(summary(n + 1, run), file=sys.stderr, flush=True)
            runs.append(run)
    result.update(medians(runs), runs=runs)
    if args.json:
        print_report(result, as_json=True)
    else:
        print_table(result)


def environment(url: str, redis_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": url,
        "BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
    }


def seed(url: str, roster: Path, redis_port: int) -> float:
    """Migrate and seed the database every run copies; the seconds the seed took."""
    env = environment(url, redis_port)
    subprocess.run([str(BIN), "db", "upgrade"], env=env, check=True, capture_output=True)
    started = time.monotonic()
    subprocess.run([str(BIN), "seed", str(roster)], env=env, check=True, capture_output=True)
    return round(time.monotonic() - started, 1)


def settle(url: str, *, vacuum: bool) -> None:
    """No checkpoint owed when a clock starts: the seed's (or the copy's) writes would
    otherwise be flushed in the middle of the timed exit. A district exits long after it was
    loaded, when autovacuum has long since been through its tables (it is off on the test
    machine this was written on): VACUUM stands in for it, unless --no-vacuum."""
    with psycopg.connect(url, autocommit=True) as conn:
        if vacuum:
            conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def measure_floor(
    args: argparse.Namespace,
    district_id: str,
    url: str,
    redis_port: int,
    tmp: Path,
    run: dict[str, Any],
) -> dict[str, float]:
    """The run's floors (``bench/floors.py``) on a fresh copy of the same district: as many
    no-op tasks as the run had teacher units, then its account batches without Celery."""
    # The worker runs in the temporary directory: ``bench`` is found from the repository.
    env = {**environment(url, redis_port), "PYTHONPATH": str(ROOT)}
    floors = [sys.executable, "-m", "bench.floors"]
    worker = start_worker(
        env, tmp / "floor-worker.log", concurrency=args.concurrency, command=[*floors, "worker"]
    )
    try:
        wait_for_workers(env, 1, [worker])
        noop = subprocess.run(
            [*floors, "noop", str(run["teacher_units"])],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        stop(worker)
    settle(url, vacuum=not args.no_vacuum)
    convert = subprocess.run(
        [*floors, "convert", district_id, "--concurrency", str(args.concurrency)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    converted = json.loads(convert.stdout)
    return {
        FLOORED["teacher_units_s"]: round(json.loads(noop.stdout)["seconds"], 2),
        FLOORED["account_batches_s"]: round(converted["seconds"], 2),
        UNITS_ALONE: round(converted["teacher_units_s"], 2),
    }


def summary(n: int, run: dict[str, Any]) -> str:
    phases = ", ".join(f"{k} {run[k]}" for k in ("start_s", *FLOORED, "finish_s"))
    floors = ", ".join(f"{v} {run[v]}" for v in (*FLOORED.values(), UNITS_ALONE) if v in run)
    return f"run {n}: exit {run['exit_s']} s ({phases})" + (f"; floor: {floors}" if floors else "")


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each phase's median over the runs, its floor's, and their ratio; the whole exit against
    the sum of its floors (its start and finish have none)."""
    out: dict[str, Any] = {}
    for phase in ("exit_s", "start_s", *FLOORED, "finish_s", "accounts_per_s"):
        out[f"median_{phase}"] = round(statistics.median(r[phase] for r in runs), 2)
    if all(floor in runs[0] for floor in FLOORED.values()):
        for phase, floor in FLOORED.items():
            value = statistics.median(r[floor] for r in runs)
            out[f"median_{floor}"] = round(value, 2)
            out[f"ratio_{phase.removesuffix('_s')}"] = round(out[f"median_{phase}"] / value, 2)
        floor_total = statistics.median(sum(r[f] for f in FLOORED.values()) for r in runs)
        out["median_floor_s"] = round(floor_total, 2)
        out["ratio_exit"] = round(out["median_exit_s"] / floor_total, 2)
        # Each exit against the floor measured right after it: steadier than the ratio of
        # medians when the machine's speed drifts between runs.
        ratios = [round(r["exit_s"] / sum(r[f] for f in FLOORED.values()), 2) for r in runs]
        out["run_ratios_exit"] = ratios
        out["median_run_ratio_exit"] = round(statistics.median(ratios), 2)
        out[f"median_{UNITS_ALONE}"] = round(statistics.median(r[UNITS_ALONE] for r in runs), 2)
        out["median_teacher_budget_s"] = round(statistics.median(map(teacher_budget, runs)), 2)
    out["peak_worker_pss_sum_mb"] = max(max(r["peak_worker_pss_sum_mb"]) for r in runs)
    return out


def teacher_budget(run: dict[str, Any]) -> float:
    """The longest the run's teacher units could have taken, the rest of its exit as it was, for
    the exit to stay within TARGET_RATIO of the floors measured after it."""
    rest = float(run["exit_s"]) - float(run["teacher_units_s"])
    return TARGET_RATIO * sum(float(run[f]) for f in FLOORED.values()) - rest


def print_table(result: dict[str, Any]) -> None:
    """The medians as a table of phase, exit, floor and ratio; then the rest of the report."""
    runs = result.pop("runs")
    print(f"medians of {len(runs)} run(s), each exit followed by its floor")
    print(f"{'phase':<16}{'exit s':>8}{'floor s':>9}{'ratio':>7}  floor")
    what = {
        "teacher_units_s": f"{runs[0]['teacher_units']} no-op Celery tasks",
        "account_batches_s": f"{runs[0]['units'] - runs[0]['teacher_units']} batches, no Celery",
        "exit_s": "the sum of the two",
    }
    floors = {**FLOORED, "exit_s": "floor_s"}
    for phase in ("start_s", *FLOORED, "finish_s", "exit_s"):
        name = phase.removesuffix("_s")
        floor = result.pop(f"median_{floors[phase]}", "") if phase in floors else ""
        ratio = result.pop(f"ratio_{name}", "")
        print(
            f"{name.replace('_', ' '):<16}{result.pop(f'median_{phase}'):>8}{floor:>9}{ratio:>7}"
            f"  {what.get(phase, '') if floor != '' else ''}"
        )
    if "run_ratios_exit" in result:
        ratios = ", ".join(str(r) for r in result.pop("run_ratios_exit"))
        median = result.pop("median_run_ratio_exit")
        print(f"each exit against its own floor: {ratios} (median {median})")
        alone, budget = result.pop(f"median_{UNITS_ALONE}"), result.pop("median_teacher_budget_s")
        print(
            f"teacher units without Celery: {alone} s over the pool's processes;"
            f" at {TARGET_RATIO}x its floors the exit leaves its teacher units {budget} s"
        )
    print()
    print_report(result, as_json=False)
    for n, run in enumerate(runs, start=1):
        print(summary(n, run))
        print(f"  {json.dumps(run)}")


def measure(
    args: argparse.Namespace, district_id: str, url: str, redis_port: int, tmp: Path
) -> dict[str, Any]:
    """One exit of the district in ``url`` through ``args.workers`` fresh workers."""
    env = environment(url, redis_port)
    workers: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {}
    try:
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM accounts WHERE district_id = %s", (district_id,)
            ).fetchone()
            assert row is not None
            result["accounts"] = int(row[0])
        for n in range(args.workers):
            workers.append(start_worker(env, tmp / f"worker{n}.log", concurrency=args.concurrency))
        # Start the clock once every worker answers (a worker's start-up is not the exit's
        # time), and settled (``settle``).
        wait_for_workers(env, args.workers, workers)
        settle(url, vacuum=not args.no_vacuum)
        with psycopg.connect(url, autocommit=True) as conn:
            wal_before = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
            checkpoints_before = conn.execute(CHECKPOINTS).fetchone()
        sampler = Sampler([w.pid for w in workers])
        sampler.start()
        cpu_before = cpu_seconds()
        started, clock = time.monotonic(), datetime.now(UTC)
        subprocess.run(
            [str(BIN), "district", "exit", district_id], env=env, check=True, capture_output=True
        )
        elapsed = wait_until_done(url, district_id, workers, tmp) - started
        cpu_after = cpu_seconds()
        with psycopg.connect(url, autocommit=True) as conn:
            wal = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", wal_before
            ).fetchone()
            checkpoints = conn.execute(CHECKPOINTS).fetchone()
            left = conn.execute(
                "SELECT count(*) FROM accounts WHERE district_id = %s", (district_id,)
            ).fetchone()
            units, teacher_units, phases = phase_times(conn, district_id, clock)
        sampler.stop.set()
        sampler.join()
        assert left == (0,), f"{left} accounts left in the district"
        result.update(
            {
                "exit_s": round(elapsed, 2),
                "units": units,
                "teacher_units": teacher_units,
                **phases,
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
            stop(w)
    return result


def wait_until_done(
    url: str, district_id: str, workers: list[subprocess.Popen[bytes]], tmp: Path
) -> float:
    """The monotonic time at which the district's latest exit was seen done."""
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT status FROM district_exits WHERE district_id = %s ORDER BY id DESC LIMIT 1",
                (district_id,),
            ).fetchone()
            if row is not None and row[0] == "done":
                return time.monotonic()
            if any(w.poll() is not None for w in workers):
                raise SystemExit("a worker died: see " + str(tmp))
            time.sleep(0.2)


def phase_times(
    conn: psycopg.Connection[Any], district_id: str, clock: datetime
) -> tuple[int, int, dict[str, float]]:
    """The exit's units, its teacher units, and where the time went: the exit's start, each
    phase's last unit, the finish step."""
    marks = conn.execute(
        "SELECT e.units_total, e.teacher_units, e.started_at,"
        " max(u.finished_at) FILTER (WHERE u.kind = 'teacher'),"
        " max(u.finished_at) FILTER (WHERE u.kind = 'accounts'), e.finished_at"
        " FROM district_exits e JOIN exit_units u ON u.exit_id = e.id"
        " WHERE e.district_id = %s GROUP BY e.id ORDER BY e.id DESC LIMIT 1",
        (district_id,),
    ).fetchone()
    assert marks is not None
    units, teachers, started, teachers_done, batches_done, finished = marks
    phases = {
        # The command's start, its task's way to a worker, the exit's first transaction.
        "start_s": started - clock,
        "teacher_units_s": teachers_done - started,
        "account_batches_s": batches_done - teachers_done,
        "finish_s": finished - batches_done,
    }
    return units, teachers, {k: round(v.total_seconds(), 2) for k, v in phases.items()}


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds per command name between two readings. Processes that ended in between
    (the CLI that started the exit) are not counted."""
    return {
        name: round(used, 1)
        for name, used in sorted(
            ((n, after[n] - before.get(n, 0.0)) for n in after), key=lambda item: -item[1]
        )
        if used >= 0.1
    }


if __name__ == "__main__":
    main()
