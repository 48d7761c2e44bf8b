#!/usr/bin/env python3
"""Benchmark: a roster sync (SPEC §5.8) of a whole district from a Clever-shaped Data API.

Serves a synthetic district (bench/make_district.py) with the Clever-shaped server the tests use
too (tests/support/fake_clever.py, run in a process of its own by bench/clever_server.py, one token
per district), then times the real command line, `grassroots sync DISTRICT_ID --json`, each
run a subprocess against a fresh Postgres database (`CLEVER_API_BASE`,
`CLEVER_DISTRICT_TOKENS` pointing at the server):

  serve      the whole district read at limit=10,000 by a plain httpx client (the server's share)
  seed       `grassroots seed` of the same file into another fresh database (for the ratio)
  bootstrap  the first sync, into an empty mirror                               target <= 60 s
  unchanged  the next sync, nothing changed: it must write nothing but its record  <= 30 s
  removal    1 % of the students gone from the server (and from their sections): from the
             command's start to the last conversion applied by a `grassroots worker`  <= 45 s
  memory     the peak RSS of each `grassroots sync` process, its own               < 500 MB

    .venv/bin/python -m bench.sync                               # 100k students, 4000 teachers
    .venv/bin/python -m bench.sync --students 5000 --teachers 200
    .venv/bin/python -m bench.sync --serve-only                  # the server alone, no database
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.clever_server import CleverServer, CleverServerError, rss_mb
from bench.common import BIN, print_report, private_redis, throwaway_database, wait_for_workers
from bench.measured import Run, run_measured
from tests.support.fake_clever import SECTIONS, USERS, district_path

TARGETS = {"bootstrap_s": 60.0, "unchanged_s": 30.0, "removal_s": 45.0, "sync_peak_rss_mb": 500.0}
# What any sync writes, changed or not: its own record, and the feed position the poller resumes
# from. A sync that finds nothing changed writes nothing else.
BOOKKEEPING = frozenset({"roster_syncs", "clever_poll_cursors"})
# Tables whose rows are reported after each sync.
MIRROR = ("accounts", "classes", "enrollments", "class_teachers", "roster_users", "roster_events")
IN_FLIGHT = frozenset({"accepted", "processing"})
FINAL = frozenset({"done", "ignored", "stale", "rejected", "discarded"})


class BenchError(Exception):
    """The benchmark could not go on, or found a behaviour it must not accept."""


def json_objects(text: str) -> Iterator[Any]:
    """Every JSON value printed one after the other (one a line, or indented)."""
    decoder = json.JSONDecoder()
    at = 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return
        value, at = decoder.raw_decode(text, at)
        yield from value if isinstance(value, list) else [value]


def sync_exists(env: dict[str, str]) -> bool:
    found = subprocess.run([str(BIN), "sync", "--help"], env=env, capture_output=True, text=True)
    return found.returncode == 0


# --------------------------------------------------------------------------------------------
# The Clever side


def serve_whole(server: CleverServer, limit: int) -> dict[str, Any]:
    """Read the district whole as a sync would, without one: the server's and the HTTP share."""
    pages, size, items = 0, 0, 0
    headers = {"authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        started = time.perf_counter()
        client.get(district_path(server.district_id)).raise_for_status()
        for path in (USERS, SECTIONS):
            uri: str | None = f"{path}?limit={limit}"
            while uri is not None:
                answer = client.get(uri).raise_for_status()
                body = answer.json()
                pages += 1
                size += len(answer.content)
                items += len(body["data"])
                links = {link["rel"]: link["uri"] for link in body["links"]}
                uri = links.get("next") if body["data"] else None
        seconds = time.perf_counter() - started
    return {
        "serve_s": round(seconds, 2),
        "serve_items": items,
        "serve_pages": pages,
        "serve_mb": round(size / 2**20, 1),
        "serve_limit": limit,
    }


# --------------------------------------------------------------------------------------------
# The database side


def table_rows(conn: psycopg.Connection[Any], tables: tuple[str, ...]) -> dict[str, int]:
    made = {
        row[0]
        for row in conn.execute(
            "SELECT relname FROM pg_stat_user_tables WHERE relname = ANY(%s)", (list(tables),)
        )
    }
    counts = {}
    for table in tables:
        if table in made:
            row = conn.execute(f'SELECT count(*) FROM "{table}"'.encode()).fetchone()
            counts[table] = int(row[0]) if row else 0
    return counts


def table_writes(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, int, int]]:
    """Rows inserted, updated and deleted so far, per table (Postgres's statistics)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return {
        name: (int(ins), int(upd), int(dele))
        for name, ins, upd, dele in conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables"
        )
    }


def database_counters(conn: psycopg.Connection[Any]) -> dict[str, int]:
    row = conn.execute(
        "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database"
        " WHERE datname = current_database()"
    ).fetchone()
    assert row is not None
    names = ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted")
    return dict(zip(names, map(int, row), strict=True))


def settle(conn: psycopg.Connection[Any]) -> None:
    """Until no other session is on the database, and a moment more: a backend hands its table
    statistics over when it ends (and at most once a second while it runs)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
        if row is not None and row[0] == 0:
            break
        time.sleep(0.1)
    time.sleep(1.0)


# --------------------------------------------------------------------------------------------
# The syncs


def one_report(run: Run, phase: str) -> dict[str, Any]:
    """The district's report from ``sync --json``; a failed sync ends the benchmark."""
    try:
        reports = list(json_objects(run.stdout))
    except json.JSONDecodeError:
        reports = []
    tail = run.stderr.strip().splitlines()[-1:] or ["(nothing on stderr)"]
    if len(reports) != 1 or not isinstance(reports[0], dict):
        raise BenchError(f"{phase}: `grassroots sync --json` printed no report: {tail[0]}")
    report: dict[str, Any] = reports[0]
    if "error" in report:  # the command's own error object (SPEC §5.6)
        raise BenchError(f"{phase}: `grassroots sync` failed: {report.get('message')}")
    if run.status != 0 or report.get("status") != "done":
        raise BenchError(
            f"{phase}: the sync ended {report.get('status')} (exit status {run.status}):"
            f" {report.get('reason')}; {tail[0]}"
        )
    return report


def sync_figures(
    phase: str, run: Run, report: dict[str, Any], requests: dict[str, Any]
) -> dict[str, Any]:
    return {
        f"{phase}_s": round(run.seconds, 2),
        f"{phase}_peak_rss_mb": round(run.peak_rss_mb),
        f"{phase}_rss_sampled_max_mb": round(run.rss_max_mb),
        f"{phase}_memory_samples": run.samples,
        f"{phase}_pulled": report.get("pulled"),
        f"{phase}_changes": report.get("changes"),
        f"{phase}_held": report.get("held"),
        f"{phase}_requests": requests,
    }


def wait_for_conversions(
    conn: psycopg.Connection[Any],
    sync_id: str,
    worker: subprocess.Popen[bytes],
    started: float,
    timeout: float,
) -> tuple[dict[str, int], datetime | None, float]:
    """Until none of the sync's inbox events is waiting or being worked on: their count per
    status and type, the last one's final time, and the seconds seen since ``started``."""
    pattern = f"sync:{sync_id}:%"
    deadline = time.monotonic() + timeout
    while True:
        rows = conn.execute(
            "SELECT status, type, count(*), max(updated_at) FROM roster_events"
            " WHERE id LIKE %s GROUP BY status, type",
            (pattern,),
        ).fetchall()
        if not any(status in IN_FLIGHT for status, *_ in rows):
            break
        if worker.poll() is not None:
            raise BenchError("the worker died while converting")
        if time.monotonic() > deadline:
            left = {f"{status} {type_}": int(n) for status, type_, n, _ in rows}
            raise BenchError(
                f"the sync's events were not all applied within {timeout:.0f} s: {left}"
            )
        time.sleep(0.1)
    seen = time.monotonic() - started
    counts = {f"{status} {type_}": int(n) for status, type_, n, _ in rows}
    last = max((at for status, _, _, at in rows if status in FINAL), default=None)
    return counts, last, seen


def wait_pending_zero(env: dict[str, str], timeout: float) -> float:
    """Until `grassroots status --json` says pending 0; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        shown = subprocess.run(
            [str(BIN), "status", "--json"], env=env, capture_output=True, text=True, timeout=60
        )
        if shown.returncode == 0 and json.loads(shown.stdout).get("pending") == 0:
            return time.monotonic() - started
        time.sleep(0.5)
    raise BenchError(f"`grassroots status` did not come to pending 0 within {timeout:.0f} s")


# --------------------------------------------------------------------------------------------
# The benchmark


def start_server(args: argparse.Namespace, stack: ExitStack) -> tuple[CleverServer, dict[str, Any]]:
    """The Clever-shaped server, in a process of its own, once it serves the district."""
    token = f"grbench-{os.getpid()}-token"
    server = stack.enter_context(CleverServer(args.students, args.teachers, token))
    info = server.info
    return server, {
        "file": info["file"],
        "users": info["users"],
        "sections": info["sections"],
        "json_load_s": info["json_load_s"],
        "server_load_s": info["server_load_s"],
        "server_footprint_mb": info["server_footprint_mb"],
        "server_rss_mb": info["server_rss_mb"],
    }


def measure(args: argparse.Namespace, result: dict[str, Any], stack: ExitStack) -> None:
    server, loaded = start_server(args, stack)
    result.update(loaded)
    result.update(serve_whole(server, args.serve_limit))
    result["bench_rss_mb"] = round(rss_mb())
    if args.serve_only:
        return
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="grbench-sync-")))
    redis_port = stack.enter_context(private_redis(tmp))
    base_env = {
        **os.environ,
        "BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
    }
    measure_seed(args, result, server, base_env)
    url = stack.enter_context(throwaway_database(f"grbench_sync_{os.getpid()}"))
    env = {
        **base_env,
        "DATABASE_URL": url,
        "CLEVER_API_BASE": server.url,
        "CLEVER_DISTRICT_TOKENS": f"{server.district_id}:{server.token}",
        "REMOVAL_BRAKE_PERCENT": str(args.brake_percent),
        "SYNC_INTERVAL": "0",
    }
    subprocess.run([str(BIN), "db", "upgrade"], env=env, check=True, capture_output=True)
    if not sync_exists(env):
        raise BenchError(
            "`grassroots sync` does not exist yet (SPEC §5.8): the server, the district and the"
            " seed were measured; bootstrap, resync and removal need the command"
        )
    syncing = Syncing(server, env, [str(BIN), "sync", server.district_id, "--json"], args.timeout)
    conn = stack.enter_context(psycopg.connect(url, autocommit=True))
    measure_bootstrap(syncing, conn, result)
    measure_unchanged(syncing, conn, result, vacuum=not args.no_vacuum)
    measure_removal(args, syncing, conn, result, stack, tmp)
    # d. the largest sync process, and this process when it started them (it holds no district).
    phases = ("bootstrap", "unchanged", "removal_sync")
    result["sync_peak_rss_mb"] = max(result[f"{p}_peak_rss_mb"] for p in phases)
    result["sync_rss_sampled_max_mb"] = max(result[f"{p}_rss_sampled_max_mb"] for p in phases)
    result["bench_rss_at_syncs_mb"] = round(max(syncing.bench_rss))


def measure_seed(
    args: argparse.Namespace, result: dict[str, Any], server: CleverServer, env: dict[str, str]
) -> None:
    """The same file loaded by `grassroots seed`, into a database of its own."""
    with throwaway_database(f"grbench_sync_seed_{os.getpid()}") as seed_url:
        env = {**env, "DATABASE_URL": seed_url}
        subprocess.run([str(BIN), "db", "upgrade"], env=env, check=True, capture_output=True)
        seeded = run_measured([str(BIN), "seed", server.info["path"]], env, args.timeout)
        if seeded.status != 0:
            raise BenchError(f"grassroots seed failed: {seeded.stderr.strip()[-300:]}")
        result["seed_s"] = round(seeded.seconds, 2)
        result["seed_peak_rss_mb"] = round(seeded.peak_rss_mb)
        result["seed_rss_sampled_max_mb"] = round(seeded.rss_max_mb)


@dataclass
class Syncing:
    """The `grassroots sync` command against the server, and this process's RSS as it starts
    each sync."""

    server: CleverServer
    env: dict[str, str]
    argv: list[str]
    timeout: float
    bench_rss: list[float] = field(default_factory=list)

    def run(
        self, phase: str, result: dict[str, Any], *, mark: int | None = None
    ) -> tuple[Run, dict[str, Any]]:
        """One sync, its figures as ``phase`` in ``result``; the run and its report. ``mark``:
        the server's request count taken before (now, if not given)."""
        mark = self.server.mark() if mark is None else mark
        run = run_measured(self.argv, self.env, self.timeout)
        self.bench_rss.append(run.bench_rss_mb)
        report = one_report(run, phase.removesuffix("_sync"))
        result.update(sync_figures(phase, run, report, self.server.requests(mark)))
        return run, report


def measure_bootstrap(
    syncing: Syncing, conn: psycopg.Connection[Any], result: dict[str, Any]
) -> None:
    """a. bootstrap: an empty mirror made from the pull."""
    run, _ = syncing.run("bootstrap", result)
    result["bootstrap_vs_seed"] = round(run.seconds / result["seed_s"], 2)
    result["rows_after_bootstrap"] = table_rows(conn, MIRROR)
    row = conn.execute(
        "SELECT count(*) FROM accounts WHERE district_id = %s", (syncing.server.district_id,)
    ).fetchone()
    result["accounts"] = int(row[0]) if row else 0
    made_all = result["accounts"] == syncing.server.info["platform_users"]
    result["checks"] = {"bootstrap_made_every_account": made_all}


def measure_unchanged(
    syncing: Syncing, conn: psycopg.Connection[Any], result: dict[str, Any], *, vacuum: bool
) -> None:
    """b. nothing changed. A district resyncs long after it was loaded, once autovacuum has been
    through its tables (it is off on the test machine): VACUUM ANALYZE stands in for it."""
    if vacuum:
        conn.execute("VACUUM ANALYZE")
    conn.execute("CHECKPOINT")
    settle(conn)
    writes_before, counters_before = table_writes(conn), database_counters(conn)
    _, report = syncing.run("unchanged", result)
    settle(conn)
    writes_after, counters_after = table_writes(conn), database_counters(conn)
    written = {}
    for table, after in writes_after.items():
        delta = [a - b for a, b in zip(after, writes_before.get(table, (0, 0, 0)), strict=True)]
        if any(delta):
            written[table] = dict(zip(("inserted", "updated", "deleted"), delta, strict=True))
    result["unchanged_writes"] = written
    result["unchanged_db_counters"] = {
        k: counters_after[k] - counters_before[k] for k in counters_after
    }
    result["checks"]["unchanged_wrote_nothing"] = not (written.keys() - BOOKKEEPING) and not any(
        (report.get("changes") or {}).values()
    )


def measure_removal(
    args: argparse.Namespace,
    syncing: Syncing,
    conn: psycopg.Connection[Any],
    result: dict[str, Any],
    stack: ExitStack,
    tmp: Path,
) -> None:
    """c. 1 % of the students leave the district's roster, through real workers."""
    gone = syncing.server.call("remove_students", every=100)  # and from their sections
    removed: list[str] = gone["removed"]
    result["removed_students"] = len(removed)
    result["remove_on_server_s"] = gone["seconds"]
    with (tmp / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [str(BIN), "worker", "--concurrency", str(args.concurrency), "-l", "warning"],
            env=syncing.env,
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack.callback(stop, worker)
    try:
        wait_for_workers(syncing.env, 1, [worker])
    except SystemExit as exc:  # how exit_pipeline.py gives up
        raise BenchError(f"{exc}; see {tmp / 'worker.log'}") from None
    mark = syncing.server.mark()
    clock, started = datetime.now(UTC), time.monotonic()
    _, report = syncing.run("removal_sync", result, mark=mark)
    try:
        counts, last, seen = wait_for_conversions(
            conn, report["sync_id"], worker, started, args.timeout
        )
    except BenchError as exc:  # the worker's log goes with the temporary directory: its end
        tail = (tmp / "worker.log").read_text(errors="replace").strip().splitlines()[-5:]
        lines = [line if len(line) <= 400 else line[:400] + " …" for line in tail]
        raise BenchError("\n".join([str(exc), "the worker's log ends:", *lines])) from None
    idle = wait_pending_zero(syncing.env, args.timeout)
    result["removal_events"] = counts
    # From the command's start to the last conversion's commit (the inbox row's last change).
    result["removal_s"] = round((last - clock).total_seconds(), 2) if last else None
    result["removal_seen_s"] = round(seen, 2)  # when this script saw every event final
    result["removal_pending_zero_s"] = round(seen + idle, 2)  # `status` said pending 0
    row = conn.execute(
        "SELECT count(*) FROM accounts WHERE id = ANY(%s) AND kind = 'grassroots'", (removed,)
    ).fetchone()
    result["removal_converted"] = int(row[0]) if row else 0
    result["checks"]["removal_converted_everyone"] = result["removal_converted"] == len(removed)
    result["rows_after_removal"] = table_rows(conn, MIRROR)


def stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def targets_met(result: dict[str, Any]) -> dict[str, bool]:
    return {
        name: result[name] is not None and result[name] <= limit
        if name != "sync_peak_rss_mb"
        else result[name] < limit
        for name, limit in TARGETS.items()
        if name in result
    }


def summary(result: dict[str, Any]) -> list[str]:
    lines = [
        f"district  {result['users']:,} users, {result['sections']:,} sections; the server holds"
        f" {result['server_footprint_mb']} MB",
        f"serve     {result['serve_s']:6.2f} s  {result['serve_items']:,} items in"
        f" {result['serve_pages']} pages ({result['serve_mb']} MB) at limit"
        f" {result['serve_limit']:,}",
    ]
    if "seed_s" in result:
        lines.append(f"seed      {result['seed_s']:6.2f} s  `grassroots seed` of the same file")
    met = result.get("targets_met", {})

    def verdict(name: str) -> str:
        unit = "MB" if name.endswith("_mb") else "s"
        sign = "<" if name.endswith("_mb") else "≤"
        return f"target {sign} {TARGETS[name]:.0f} {unit}: {'met' if met[name] else 'MISSED'}"

    if "bootstrap_s" in result:
        lines.append(
            f"bootstrap {result['bootstrap_s']:6.2f} s  {verdict('bootstrap_s')}"
            f" ({result['bootstrap_vs_seed']} x seed)"
        )
    if "unchanged_s" in result:
        others = sorted(result["unchanged_writes"].keys() - BOOKKEEPING)
        wrote = f"wrote to {', '.join(others)}" if others else "wrote nothing but its record"
        lines.append(f"unchanged {result['unchanged_s']:6.2f} s  {verdict('unchanged_s')}; {wrote}")
    if "removal_s" in result:
        took = "   n/a" if result["removal_s"] is None else f"{result['removal_s']:6.2f}"
        lines.append(
            f"removal   {took} s  {verdict('removal_s')};"
            f" {result['removal_converted']:,} of {result['removed_students']:,} students"
            f" converted (the sync itself {result['removal_sync_s']:.2f} s)"
        )
    if "sync_peak_rss_mb" in result:
        each = ", ".join(
            f"{name} {result[f'{phase}_peak_rss_mb']}"
            for name, phase in (
                ("bootstrap", "bootstrap"),
                ("unchanged", "unchanged"),
                ("removal", "removal_sync"),
            )
        )
        lines.append(
            f"memory    {result['sync_peak_rss_mb']:6.0f} MB peak RSS of a sync process, its own"
            f" VmHWM ({each}; sampled RSS at most {result['sync_rss_sampled_max_mb']} MB);"
            f" {verdict('sync_peak_rss_mb')}"
        )
    failed = [name for name, ok in result.get("checks", {}).items() if not ok]
    if failed:
        lines.append(f"FAILED checks: {', '.join(failed)}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--students", type=int, default=100_000)
    parser.add_argument("--teachers", type=int, default=4_000)
    parser.add_argument("--concurrency", type=int, default=2, help="the worker's pool size")
    parser.add_argument(
        "--brake-percent",
        type=float,
        default=100.0,
        help="REMOVAL_BRAKE_PERCENT of the syncs and the worker (100: the brake holds nothing)",
    )
    parser.add_argument("--serve-limit", type=int, default=10_000, help="page size of `serve`")
    parser.add_argument(
        "--serve-only", action="store_true", help="only the server: load and serve the district"
    )
    parser.add_argument(
        "--no-vacuum",
        action="store_true",
        help="resync straight after the bootstrap, without the VACUUM autovacuum would make",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    # A plain kill still unwinds: the databases are dropped, the worker and redis stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    result: dict[str, Any] = {"students": args.students, "teachers": args.teachers}
    error: BenchError | CleverServerError | None = None
    with ExitStack() as stack:
        try:
            measure(args, result, stack)
        except (BenchError, CleverServerError) as exc:
            error = exc
    result["targets_met"] = targets_met(result)
    print_report(result, as_json=args.json)
    if not args.json:
        print()
        print("\n".join(summary(result)))
    if error is not None:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    return 0 if all(result.get("checks", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
