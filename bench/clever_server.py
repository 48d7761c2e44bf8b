#!/usr/bin/env python3
"""The Clever-shaped server of bench/sync.py, in a process of its own.

    .venv/bin/python -m bench.clever_server --students N --teachers M --token TOKEN

Loads the synthetic district (``bench/out/district-s<N>-t<M>.json``, written first if missing)
into the Clever-shaped server the tests use too (tests/support/fake_clever.py, ``FakeClever``) under
``TOKEN``, prints one JSON line on stdout (its URL and what it loaded), then serves until its
stdin closes (or SIGTERM), answering each JSON line read on stdin with one JSON line:

  {"op": "mark"}                         the number of requests the district received so far
  {"op": "requests", "since": N}         those received since N, per path: how many, with which
                                         limits, answered how
  {"op": "remove_students", "every": K}  every K-th student by id (1 % for K=100) leaves the
                                         roster, and their sections: the ids, and the seconds

Why a process of its own: the district, parsed and loaded, is hundreds of MB, and a sync
subprocess forked from the process holding it would report that process's peak as its own (see
``run_measured`` in measured.py); the benchmark's own process stays small. ``CleverServer`` below is
the benchmark's side of it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from bench.common import ROOT, district_file
from tests.support.fake_clever import DISTRICTS, FakeClever

PLATFORM_ROLES = frozenset({"student", "teacher", "district_admin"})


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------------------------
# The server's side


def load(fake: FakeClever, path: Path, token: str) -> dict[str, Any]:
    started = time.perf_counter()
    snapshot: dict[str, Any] = json.loads(path.read_bytes())
    parsed = time.perf_counter() - started
    district_id: str = snapshot["districts"][0]["id"]
    users = snapshot["users"]
    platform_users = sum(1 for u in users if PLATFORM_ROLES & set(u.get("roles", {})))
    started = time.perf_counter()
    fake.roster(district_id, token, snapshot)
    loaded = time.perf_counter() - started
    del snapshot, users
    return {
        "url": fake.url,
        "district_id": district_id,
        "path": str(path),
        "file": path.name,
        "users": len(fake.user_ids(district_id)),
        "sections": len(fake.section_ids(district_id)),
        "students": len(fake.user_ids(district_id, "student")),
        "platform_users": platform_users,
        "json_load_s": round(parsed, 2),
        "server_load_s": round(loaded, 2),
        # What the server keeps: each item's JSON bytes, their ids and index (tracemalloc agrees).
        # Its process's RSS says little of it: the parsed snapshot's freed memory stays
        # interleaved with the server's bytes in the allocator's arenas.
        "server_footprint_mb": round(fake.footprint(district_id) / 2**20),
        "server_pid": os.getpid(),
        "server_rss_mb": round(rss_mb()),
    }


def requests_made(fake: FakeClever, district_id: str, since: int) -> dict[str, Any]:
    """The requests made since ``since``, per path: how many, with which limits, answered how."""
    seen = fake.requests(district_id)[since:]
    paths: dict[str, dict[str, Any]] = {}
    for request in seen:
        path = DISTRICTS if request.path.startswith(DISTRICTS + "/") else request.path
        entry = paths.setdefault(path, {"requests": 0, "limits": set(), "statuses": Counter()})
        entry["requests"] += 1
        entry["limits"].add(request.query.get("limit"))
        entry["statuses"][request.status] += 1
    return {
        path: {
            "requests": e["requests"],
            "limits": sorted(str(limit) for limit in e["limits"] if limit is not None),
            "statuses": {str(status): n for status, n in e["statuses"].items()},
        }
        for path, e in paths.items()
    }


def remove_students(fake: FakeClever, district_id: str, every: int) -> dict[str, Any]:
    """Every ``every``-th student by id (``len // every`` of them) leaves the roster and the
    sections that listed them, as Clever serves a deleted user."""
    students = fake.user_ids(district_id, "student")
    removed = students[::every][: len(students) // every]
    started = time.perf_counter()
    fake.remove_users(district_id, *removed)
    return {"removed": removed, "seconds": round(time.perf_counter() - started, 2)}


def answer(fake: FakeClever, district_id: str, command: dict[str, Any]) -> dict[str, Any]:
    op = command.get("op")
    if op == "mark":
        return {"mark": len(fake.requests(district_id))}
    if op == "requests":
        return {"requests": requests_made(fake, district_id, int(command["since"]))}
    if op == "remove_students":
        return remove_students(fake, district_id, int(command["every"]))
    return {"error": f"unknown op {op!r}"}


def reply(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--students", type=int, required=True)
    parser.add_argument("--teachers", type=int, required=True)
    parser.add_argument("--token", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with FakeClever() as fake:
        info = load(fake, district_file(args.students, args.teachers), args.token)
        reply(info)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                reply(answer(fake, info["district_id"], json.loads(line)))
            except Exception as exc:  # the benchmark reports it; the server goes on
                reply({"error": f"{type(exc).__name__}: {exc}"})
    return 0


# --------------------------------------------------------------------------------------------
# The benchmark's side


class CleverServerError(Exception):
    pass


class CleverServer:
    """``clever_server.py`` as a subprocess, and its commands: a context manager."""

    def __init__(self, students: int, teachers: int, token: str) -> None:
        self.token = token
        self._proc = subprocess.Popen(
            [
                sys.executable,
                *("-m", "bench.clever_server"),
                *("--students", str(students), "--teachers", str(teachers), "--token", token),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,  # where ``bench`` and ``tests`` are found
        )
        try:
            self.info = self._read()  # once the district is loaded and served
        except BaseException:
            self.close()
            raise
        self.url: str = self.info["url"]
        self.district_id: str = self.info["district_id"]

    def __enter__(self) -> CleverServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.close()  # the server's loop ends on EOF
                self._proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        stdin: IO[str] | None = self._proc.stdin
        if stdin is None or self._proc.poll() is not None:
            raise CleverServerError(
                f"the Clever-shaped server has exited ({self._proc.returncode})"
            )
        stdin.write(json.dumps({"op": op, **fields}) + "\n")
        stdin.flush()
        return self._read()

    def mark(self) -> int:
        return int(self.call("mark")["mark"])

    def requests(self, since: int) -> dict[str, Any]:
        made: dict[str, Any] = self.call("requests", since=since)["requests"]
        return made

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise CleverServerError(
                f"the Clever-shaped server exited ({self._proc.returncode}) without answering"
            )
        value: dict[str, Any] = json.loads(line)
        if "error" in value:
            raise CleverServerError(f"the Clever-shaped server: {value['error']}")
        return value


if __name__ == "__main__":
    sys.exit(main())
