"""Helpers for the fault tests (``tests/test_faults.py``, ``tests/test_worker_faults.py``,
``tests/test_worker_outages.py``): worker children, a row lock held by the test, what Postgres says
is waiting, the example district seeded under a tag, the dead letters, and what each run of a task
returned in the worker's log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from tests.support import scenario
from tests.support.scenario import Copy
from tests.support.stack import Stack, clever_event, wait_until

T0 = "2026-10-01T00:00:00Z"


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a worker's pool children)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@contextmanager
def row_lock(database_url: str, table: str, row_id: str) -> Iterator[None]:
    """Another transaction holding a row's lock, as a long admin query would."""
    with psycopg.connect(database_url) as conn:
        conn.execute(f"SELECT id FROM {table} WHERE id = %s FOR UPDATE", (row_id,))
        yield
        conn.rollback()


def scalar(database_url: str, sql: str, *params: Any) -> Any:
    """The first column of the first row of a query (None if there is no row)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(sql.encode(), params).fetchone()
    return None if row is None else row[0]


def journal_entries(database_url: str, account_id: str) -> int:
    return int(
        scalar(
            database_url,
            "SELECT count(*) FROM conversion_journal WHERE account_id = %s",
            account_id,
        )
    )


def lock_waiters(database_url: str) -> int:
    """Connections to the database waiting for a lock."""
    return int(
        scalar(
            database_url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'",
        )
    )


def _socket_inodes(local_ports: set[int]) -> set[str]:
    """The inodes of this machine's TCP sockets bound to ``local_ports``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) in local_ports:
                inodes.add(fields[9])
    return inodes


def lock_waiting_processes(database_url: str, candidates: list[int]) -> list[int]:
    """Which of ``candidates`` (say a worker's children) hold a connection to the database that
    is waiting for a lock: Postgres knows each client's port, /proc which process owns it."""
    with psycopg.connect(database_url) as conn:
        ports = {
            int(row[0])
            for row in conn.execute(
                "SELECT client_port FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND client_port IS NOT NULL"
            )
        }
    if not ports:
        return []
    sockets = {f"socket:[{inode}]" for inode in _socket_inodes(ports)}
    found = []
    for pid in candidates:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def seed_copy(stack: Stack, tag: str) -> Copy:
    """The example district, its ids rewritten with ``tag``, seeded into the stack."""
    copy = Copy(tag)
    path = stack.tmp / f"roster-{tag}.json"
    path.write_text(json.dumps(copy.data))
    stack.cli("seed", str(path))
    return copy


def deleted(copy: Copy, name: str, who: str) -> dict[str, Any]:
    """A Clever ``users.deleted`` of a student of the copy."""
    obj = {"id": copy(who), "district": copy(scenario.DISTRICT), "roles": {"student": {}}}
    return clever_event(f"{copy.tag}-{name}", "users.deleted", obj, created=T0)


@contextmanager
def blocked_conversion(
    stack: Stack, url: str, copy: Copy, name: str, who: str = scenario.STEVE
) -> Iterator[tuple[str, dict[str, Any]]]:
    """A student's ``users.deleted`` accepted, its conversion waiting on the student's row lock,
    which is held until the block ends. Yields the student and the event."""
    student = copy(who)
    event = deleted(copy, name, who)
    with row_lock(url, "accounts", student):
        assert stack.post(event).status_code == 202
        wait_until(lambda: lock_waiters(url) > 0, what="the conversion to block on the lock")
        yield student, event


def post_and_wait(
    stack: Stack, event: dict[str, Any], status: str, *, timeout: float = 30, what: str
) -> None:
    """Post an event (accepted) and wait until it has ``status``: the worker still takes work."""
    assert stack.post(event).status_code == 202
    wait_until(lambda: stack.event(event["id"])["status"] == status, timeout=timeout, what=what)


def dead_letters(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return list(cur.execute("SELECT * FROM dead_letters ORDER BY id"))


def outcomes(log: str, task_id: str) -> list[str]:
    """What each run of the task that finished in the worker's log returned."""
    found = []
    for line in log.splitlines():
        if task_id in line and line.startswith("{"):
            data = json.loads(line).get("data") or {}
            if data.get("id") == task_id and "return_value" in data:
                found.append(str(data["return_value"]))
    return found
