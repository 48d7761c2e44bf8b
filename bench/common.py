"""What the benchmark scripts share: the district files, a throwaway database, a private
redis-server, a spare port, the report."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from bench.make_district import make_district, write_district
from worker.run import redis_server_argv

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
BIN = Path(sys.executable).parent / "grassroots"
CELERY = Path(sys.executable).parent / "celery"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", DEFAULT_ADMIN_URL)


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def district_parser(doc: str | None, *, students: int, teachers: int) -> argparse.ArgumentParser:
    """A benchmark's command line, with the district's size (``district_file``) and --json."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--students", type=int, default=students)
    parser.add_argument("--teachers", type=int, default=teachers)
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    return parser


def district_file(students: int, teachers: int) -> Path:
    """A synthetic district (``make_district.py`` beside this file, default options otherwise),
    cached as ``bench/out/district-s<N>-t<M>.json``; written under another name first, so an
    interrupted run leaves no half file behind."""
    path = OUT / f"district-s{students}-t{teachers}.json"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.part")
        write_district(make_district(students=students, teachers=teachers), partial)
        partial.rename(path)
    return path


def database_url(name: str, admin_url: str = ADMIN_URL) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


@contextmanager
def throwaway_database(
    name: str, *, template: str | None = None, admin_url: str = ADMIN_URL
) -> Iterator[str]:
    """A new Postgres database (empty, or a copy of ``template``), dropped on the way out."""
    # FILE_COPY (Postgres 15+): copies the files instead of writing the whole database to WAL.
    copy = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{copy}'.encode())
    try:
        yield database_url(name, admin_url)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@contextmanager
def private_redis(directory: Path) -> Iterator[int]:
    """A redis-server of our own on a spare loopback port, keeping nothing on disk; its port."""
    port = spare_port()
    server = subprocess.Popen(
        redis_server_argv(port, directory, persistent=False), stdout=subprocess.DEVNULL
    )
    try:
        yield port
    finally:
        server.terminate()
        server.wait()


def print_report(result: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    width = max(map(len, result), default=0)
    for key, value in result.items():
        print(f"{key:>{width}}  {value}")


def start_worker(
    env: dict[str, str],
    log: Path,
    *,
    concurrency: int,
    command: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """``grassroots worker`` (or ``command``, which takes the same options) in a session of its
    own, logging to ``log`` at BENCH_WORKER_LOGLEVEL (default warning)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                *(command or [str(BIN), "worker"]),
                "--concurrency",
                str(concurrency),
                "-l",
                os.environ.get("BENCH_WORKER_LOGLEVEL", "warning"),
            ],
            env=env,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    """Kill a process started in a session of its own, and everything in that session."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


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
