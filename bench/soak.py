#!/usr/bin/env python3
"""Soak: signed events at a steady rate through a real stack while faults come on a schedule,
then a full account (``make soak``; a few minutes; not part of ``make test``).

The stack is the tests' own (``tests/support/stack.py``): ``grassroots serve``, two ``grassroots
worker`` processes and ``grassroots beat`` against a fresh Postgres database and a redis-server of
its own (append-only, as in production), the district of ``make_district.py`` seeded. Events go
to the receiver at ``--rate`` a second, as Clever sends them: a ``users.deleted`` for each
student in turn, teachers' name changes, events of resources we ignore, and the same event sent
twice; one that gets no ``202`` is sent again, signed anew, as Clever retries.

Meanwhile, on a schedule spread over ``--seconds``: a worker is SIGKILLed and another SIGTERMed,
Redis is SIGKILLed (started again 5 s later) and then paused (``CLIENT PAUSE``), every database
connection of the soak's own database is cut (``pg_terminate_backend``), the receiver and beat
are SIGKILLed. A supervisor loop starts each again as systemd would, 2 s after it ended,
whether a fault ended it or it exited on its own; the latter are named in the account.

Then, once sending has stopped and the pipeline is idle: every event that got a ``202`` is final
and none is dead, every student whose removal got a ``202`` is converted, and every process that
exited on its own is named. Exit status 1 if any of that fails.

    .venv/bin/python -m bench.soak [--seconds 180] [--rate 20] [--students 2000] [--json]
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
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from bench.common import ADMIN_URL, print_report, throwaway_database
from bench.make_district import make_district
from tests.support.stack import SECRET, RedisServer, Stack, clever_event, wait_until
from worker.run import redis_server_argv
from worker.signing import signed_headers

WORKERS = ("worker0", "worker1")
RESTART_AFTER = 2.0  # seconds, as a supervisor's RestartSec
FINAL = {"done", "ignored", "stale", "rejected", "discarded"}
# When each fault comes, as a fraction of the sending time.
SCHEDULE = (
    (0.08, "SIGKILL worker0"),
    (0.18, "SIGTERM worker1"),
    (0.30, "SIGKILL redis, start it 5 s later"),
    (0.45, "CLIENT PAUSE redis 10 s"),
    (0.58, "cut every database connection"),
    (0.70, "SIGKILL the receiver"),
    (0.80, "SIGKILL beat"),
    (0.90, "SIGKILL worker1"),
)


class PersistentRedis(RedisServer):
    """The tests' redis-server, append-only as in production: what it queued outlives a kill."""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            redis_server_argv(self.port, self.directory, persistent=True),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, timeout=10, what=f"redis on {self.port}")


@dataclass
class Exited:
    name: str
    code: int | None
    at_s: float
    why: str


def last_words(log: str) -> str:
    """What a process said as it ended: its last critical line, else its last error, else its
    last line (with the exception's own last line, for a JSON log record that carries one)."""
    records: list[dict[str, Any]] = []
    lines = log.splitlines()[-60:]
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    for level in ("critical", "error"):
        for record in records:
            if record.get("level") == level:
                message = str(record.get("msg", ""))
                exception = str(record.get("exception", "")).strip().splitlines()
                return message + (f" ({exception[-1]})" if exception else "")
    return lines[-1][:300] if lines else ""


@dataclass
class Supervisor:
    """Keeps every process of the stack running: one that ended is started again after
    ``RESTART_AFTER``; one that ended without a fault of ours is recorded."""

    stack: Stack
    started: float
    commands: dict[str, tuple[str, ...]]
    exited: list[Exited] = field(default_factory=list)
    restarts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    expected: set[str] = field(default_factory=set)

    def start(self, name: str) -> None:
        self.stack.spawn(name, *self.commands[name])

    def fault(self, name: str, sig: int, *, wait: float = 60) -> None:
        """``sig`` to ``name``'s process group, as an operator or the kernel would; started
        again once it has ended."""
        with self.lock:
            self.expected.add(name)
            proc = self.stack.procs[name]
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        time.sleep(RESTART_AFTER)
        with self.lock:
            self.start(name)
            self.restarts[name] += 1
            self.expected.discard(name)

    def check(self) -> None:
        with self.lock:
            for name, proc in list(self.stack.procs.items()):
                if name in self.expected or proc.poll() is None:
                    continue
                at = round(time.monotonic() - self.started, 1)
                self.exited.append(
                    Exited(name, proc.returncode, at, last_words(self.stack.log(name)))
                )
                self.expected.add(name)
                threading.Timer(RESTART_AFTER, self._restart, (name,)).start()

    def _restart(self, name: str) -> None:
        with self.lock:
            self.start(name)
            self.restarts[name] += 1
            self.expected.discard(name)


@dataclass
class Sender:
    """Signed events at a steady rate; what got no 202 is sent again at the next ticks."""

    base: str
    plan: deque[tuple[str, dict[str, Any]]]
    rate: float
    accepted: dict[str, str] = field(default_factory=dict)  # event id -> kind
    answers: Counter[str] = field(default_factory=Counter)
    retry: deque[tuple[str, dict[str, Any]]] = field(default_factory=deque)
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as http:
            tick = time.monotonic()
            while not self.stop.is_set() and (self.plan or self.retry):
                item = self.retry.popleft() if self.retry else self._next()
                if item is not None:
                    self._send(http, *item)
                tick += 1 / self.rate
                time.sleep(max(0.0, tick - time.monotonic()))

    def drain(self, timeout: float) -> None:
        """Send what is still owed a 202 until each has one, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base, timeout=10) as http:
            while self.retry and time.monotonic() < deadline:
                self._send(http, *self.retry.popleft())
                time.sleep(0.05)

    def _next(self) -> tuple[str, dict[str, Any]] | None:
        kind, event = self.plan.popleft()
        if kind == "duplicate":
            if not self.sent:
                return None
            kind, event = self.sent[len(self.sent) // 2]
            return f"duplicate-{kind}", event
        return kind, event

    def _send(self, http: httpx.Client, kind: str, event: dict[str, Any]) -> None:
        body = json.dumps(event).encode()
        headers = {"content-type": "application/json", **signed_headers(SECRET, body)}
        try:
            code = str(http.post("/webhooks/clever", content=body, headers=headers).status_code)
        except httpx.HTTPError as exc:
            code = type(exc).__name__
        self.answers[code] += 1
        if code == "202":
            if not kind.startswith("duplicate"):
                self.accepted[event["id"]] = kind
                self.sent.append((kind, event))
        else:
            self.retry.append((kind, event))


def plan(roster: dict[str, Any], total: int) -> deque[tuple[str, dict[str, Any]]]:
    """``total`` events: half the students' removals, the rest teachers' name changes, ignored
    resources and duplicates."""
    district = roster["districts"][0]["id"]
    students = [u for u in roster["users"] if "student" in u["roles"]]
    teachers = [u for u in roster["users"] if set(u["roles"]) == {"teacher"}]
    events: deque[tuple[str, dict[str, Any]]] = deque()
    leaving = iter(students)
    for n in range(total):
        now = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
        slot = n % 10
        student = next(leaving, None) if slot < 5 else None
        if student is not None:
            obj = {"id": student["id"], "district": district, "roles": student["roles"]}
            event = clever_event(f"soak-del-{n}", "users.deleted", obj, created=now)
            events.append(("removal", event))
        elif slot < 8:
            teacher = teachers[n % len(teachers)]
            obj = {**teacher, "name": {**teacher["name"], "last": f"Renamed {n}"}}
            prev = {"name": teacher["name"]}
            event = clever_event(f"soak-upd-{n}", "users.updated", obj, created=now, previous=prev)
            events.append(("rename", event))
        elif slot == 8:
            school = {"id": f"school-{n}", "district": district, "name": "A school"}
            events.append(
                ("ignored", clever_event(f"soak-sch-{n}", "schools.updated", school, created=now))
            )
        else:
            events.append(("duplicate", {}))
    return events


def cut_connections(url: str) -> int:
    """Every other connection to the soak's own database ended; how many."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


def kill_redis(stack: Stack) -> None:
    server = stack.redis.proc
    assert server is not None
    server.kill()
    server.wait(10)
    stack.redis.proc = None
    time.sleep(5)
    stack.redis.start()


def pause_redis(stack: Stack) -> None:
    """Every client of Redis waits 10 s, as during a failover or a long command."""
    with redis.Redis(port=stack.redis.port) as client:
        client.client_pause(10_000)


def faults(stack: Stack, supervisor: Supervisor) -> dict[str, Callable[[], Any]]:
    return {
        "SIGKILL worker0": lambda: supervisor.fault("worker0", signal.SIGKILL),
        "SIGTERM worker1": lambda: supervisor.fault("worker1", signal.SIGTERM, wait=120),
        "SIGKILL redis, start it 5 s later": lambda: kill_redis(stack),
        "CLIENT PAUSE redis 10 s": lambda: redis.Redis(port=stack.redis.port).client_pause(10_000),
        "cut every database connection": lambda: cut_connections(stack.database_url),
        "SIGKILL the receiver": lambda: supervisor.fault("serve", signal.SIGKILL),
        "SIGKILL beat": lambda: supervisor.fault("beat", signal.SIGKILL),
        "SIGKILL worker1": lambda: supervisor.fault("worker1", signal.SIGKILL),
    }


def statuses(url: str, ids: list[str]) -> dict[str, tuple[str, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id, status, attempts FROM roster_events WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {str(i): (str(s), int(a)) for i, s, a in rows}


def settled(stack: Stack, sender: Sender) -> bool:
    """Pending 0 and every accepted event final."""
    try:
        if stack.status()["pending"] != 0:
            return False
    except (AssertionError, httpx.HTTPError):
        return False
    found = statuses(stack.database_url, list(sender.accepted))
    return all(found.get(e, ("missing", 0))[0] in FINAL for e in sender.accepted)


def account(stack: Stack, sender: Sender, roster: dict[str, Any]) -> dict[str, Any]:
    url = stack.database_url
    found = statuses(url, list(sender.accepted))
    by_status = Counter(found.get(e, ("missing", 0))[0] for e in sender.accepted)
    removed = {
        e["data"]["object"]["id"]
        for kind, e in sender.sent
        if kind == "removal" and e["id"] in sender.accepted
    }
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT clever_id, kind FROM accounts WHERE clever_id = ANY(%s)", (list(removed),)
        ).fetchall()
        kinds = {str(clever): str(kind) for clever, kind in rows}
        open_letters = conn.execute(
            "SELECT count(*) FROM dead_letters WHERE resolved_at IS NULL"
        ).fetchone()
    attempts = [a for _, a in found.values()]
    return {
        "events_by_status": dict(sorted(by_status.items())),
        "not_final": sorted(
            e for e in sender.accepted if found.get(e, ("missing", 0))[0] not in FINAL
        ),
        "dead_letters_open": int(open_letters[0]) if open_letters else 0,
        "students_removed": len(removed),
        "students_not_converted": sorted(s for s in removed if kinds.get(s) != "grassroots"),
        "events_retried": sum(1 for a in attempts if a > 1),
        "most_attempts": max(attempts, default=0),
    }


def _ready(stack: Stack, name: str) -> bool:
    return "ready." in stack.log(name)


def start_stack(stack: Stack, roster_file: Path) -> dict[str, tuple[str, ...]]:
    """Redis, the database's schema and the district, then every process; their commands."""
    commands = {
        "serve": ("serve", "--port", str(stack.port)),
        **{name: ("worker", "--concurrency", "2", "-l", "info") for name in WORKERS},
        "beat": ("beat",),
    }
    stack.redis.start()
    stack.cli("db", "upgrade")
    stack.cli("seed", str(roster_file))
    stack.start_server()
    for name in WORKERS:
        stack.spawn(name, *commands[name])
        wait_until(partial(_ready, stack, name), timeout=120, what=f"{name} ready")
    stack.spawn("beat", *commands["beat"])
    return commands


def run_faults(
    stack: Stack, supervisor: Supervisor, seconds: float, started: float
) -> list[dict[str, Any]]:
    """The schedule's faults, each at its time; what each did and when."""
    done = []
    actions = faults(stack, supervisor)
    for at, name in SCHEDULE:
        time.sleep(max(0.0, started + at * seconds - time.monotonic()))
        began = time.monotonic()
        outcome = actions[name]()
        done.append(
            {
                "fault": name,
                "at_s": round(began - started, 1),
                "took_s": round(time.monotonic() - began, 1),
                # How many database connections were cut.
                **({"result": outcome} if type(outcome) is int else {}),
            }
        )
    return done


def soak(args: argparse.Namespace, tmp: Path, url: str) -> dict[str, Any]:
    roster = make_district(students=args.students, teachers=max(4, args.students // 25))
    roster_file = tmp / "roster.json"
    roster_file.write_text(json.dumps(roster))
    # The shipped defaults, but two: removals of half the district are not held by the brake,
    # and retries back off 30 s at most, so the soak settles in minutes.
    stack = Stack(
        tmp,
        url,
        REMOVAL_BRAKE_PERCENT="100",
        RETRY_BACKOFF_MAX="30",
        RELAY_INTERVAL="5",
        RELAY_AFTER_SECONDS="30",
        LOCK_TIMEOUT_MS="5000",
    )
    stack.redis = PersistentRedis(tmp, port=stack.redis.port)
    try:
        commands = start_stack(stack, roster_file)
        started = time.monotonic()
        supervisor = Supervisor(stack, started, commands)
        sender = Sender(stack.base, plan(roster, int(args.seconds * args.rate)), args.rate)
        watching = threading.Event()

        def watch() -> None:
            while not watching.wait(0.5):
                supervisor.check()

        threads = [threading.Thread(target=sender.run), threading.Thread(target=watch)]
        for thread in threads:
            thread.start()
        try:
            done = run_faults(stack, supervisor, args.seconds, started)
            threads[0].join()
            sent_s = time.monotonic() - started
            sender.drain(timeout=180)
            wait_until(lambda: settled(stack, sender), timeout=900, what="the pipeline to settle")
            settled_s = time.monotonic() - started - sent_s
        finally:
            sender.stop.set()
            watching.set()
            for thread in threads:
                thread.join()
        return {
            "sending_s": round(sent_s, 1),
            "settled_after_s": round(settled_s, 1),
            "answers": dict(sorted(sender.answers.items())),
            "accepted": len(sender.accepted),
            "never_accepted": len(sender.retry),
            "faults": done,
            "restarts": dict(sorted(supervisor.restarts.items())),
            "exited_on_their_own": [vars(e) for e in supervisor.exited],
            **account(stack, sender, roster),
        }
    finally:
        stack.stop()


def problems(report: dict[str, Any]) -> list[str]:
    found = []
    if report["not_final"]:
        found.append(f"{len(report['not_final'])} accepted event(s) not final")
    if "dead" in report["events_by_status"] or report["dead_letters_open"]:
        found.append(f"{report['dead_letters_open']} open dead letter(s)")
    if report["students_not_converted"]:
        found.append(f"{len(report['students_not_converted'])} removed student(s) not converted")
    if report["never_accepted"]:
        found.append(f"{report['never_accepted']} event(s) never got a 202")
    for exited in report["exited_on_their_own"]:
        found.append(f"{exited['name']} exited on its own (status {exited['code']})")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=180, help="how long events are sent")
    parser.add_argument("--rate", type=float, default=20, help="events a second")
    parser.add_argument("--students", type=int, default=2000)
    parser.add_argument("--postgres-url", default=ADMIN_URL)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="grassroots-soak-") as tmp,
        throwaway_database(f"grsoak_{os.getpid()}", admin_url=args.postgres_url) as url,
    ):
        report = soak(args, Path(tmp), url)
    report["problems"] = problems(report)
    print_report(report, as_json=args.json)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
