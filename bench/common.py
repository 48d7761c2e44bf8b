"""What the benchmark scripts share: the district files, a throwaway database, a private
redis-server, a spare port, the report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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
