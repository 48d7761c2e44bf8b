"""The poller as a process, SPEC §5.3: a real ``grassroots poll`` killed from outside mid-pass
loses nothing and sends nothing to the workers twice; the command's report and exit status; and
the Celery task's name and districts.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from tasks.inbox import ingest
from tests.support.fake_clever import FakeClever, Scripted
from tests.support.poller import FAST, Db, Ids, Poller, after
from tests.support.stack import RedisServer, wait_until
from worker import db as worker_db
from worker.cli.poll import poll as poll_command
from worker.jobs import poll as poll_task
from worker.names import ROUTES
from worker.settings import get_settings

# --------------------------------------------------------------------------------------------
# Crashes, from outside: a real `grassroots poll` process killed mid-pass


def _poll_env(db: Db, clever: FakeClever, ids: Ids, broker: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
        "DATABASE_URL": db.url,
        "BROKER_URL": broker,
        "CLEVER_API_BASE": clever.url,
        "CLEVER_DISTRICT_TOKENS": f"{ids.district()}:{ids.token()}",
    }


def _poll_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", "poll", "--page-size", "2", *args]


def _sent_to_workers(broker: RedisServer) -> Counter[str]:
    """Event ids in the broker's ``events`` queue (Celery protocol 2 messages)."""
    client = redis.Redis.from_url(broker.url)
    try:
        messages = [json.loads(raw) for raw in client.lrange("events", 0, -1)]
    finally:
        client.close()
    return Counter(json.loads(base64.b64decode(m["body"]))[0][0] for m in messages)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_poller_killed_mid_page_resumes_from_the_last_committed_page(
    db: Db, ids: Ids, clever: FakeClever, poll: Poller, broker: RedisServer, tmp_path: Path
) -> None:
    d = ids.district()
    poll()
    clever.add(d, *(ids.event(n) for n in range(1, 7)))
    stall = threading.Event()
    clever.script(d, Scripted(stall=stall, after=ids.eid(2)))
    proc = subprocess.Popen(
        _poll_command(),
        env=_poll_env(db, clever, ids, broker.url),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: ids.eid(2) in after(clever, d), timeout=60, what="the stalled page")
        assert db.inbox(d) == ids.eids(range(1, 3)) and db.cursor(d).cursor == ids.eid(2)
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=30)
    stall.set()

    restarted = poll()

    # The restart asked for what follows the last committed page, not for the stalled one again.
    assert after(clever, d)[-3:] == [ids.eid(2), ids.eid(4), ids.eid(6)]
    assert (restarted.outcome, restarted.new) == ("polled", 4)
    assert db.inbox(d) == ids.eids(range(1, 7)) and db.cursor(d).cursor == ids.eid(6)
    sent = _sent_to_workers(broker) + Counter(poll.sent)
    assert sent == Counter(ids.eids(range(1, 7)))
    assert ids.token() not in (out + err).decode()


def test_a_poller_killed_between_storing_a_page_and_committing_it_loses_and_repeats_nothing(
    postgresql_db: Db, ids: Ids, clever: FakeClever, broker: RedisServer, tmp_path: Path
) -> None:
    db, d = postgresql_db, ids.district()
    poll = Poller(db, ids, replace(FAST, base_url=clever.url))
    poll()
    clever.add(d, *(ids.event(n) for n in range(1, 7)))
    # Hold event 4 in an open transaction: the poller stores event 3 of page 2, then waits on
    # event 4 inside its page transaction, where it is killed.
    with db.engine.connect() as holder:
        holding = holder.begin()
        ingest(Session(bind=holder), ids.event(4), source="webhook")
        proc = subprocess.Popen(
            _poll_command(), env=_poll_env(db, clever, ids, broker.url), cwd=tmp_path
        )
        try:
            wait_until(lambda: _blocked(db.engine), timeout=60, what="the poller to block")
            assert db.inbox(d) == ids.eids(range(1, 3)) and db.cursor(d).cursor == ids.eid(2)
        finally:
            proc.kill()
            proc.wait(30)
        # The process is gone; so is its database session, with the uncommitted page.
        with db.engine.connect() as admin:
            admin.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        holding.rollback()
    assert db.inbox(d) == ids.eids(range(1, 3))

    restarted = poll()

    assert (restarted.outcome, restarted.new) == ("polled", 4)
    assert db.inbox(d) == ids.eids(range(1, 7)) and db.cursor(d).cursor == ids.eid(6)
    sent = _sent_to_workers(broker) + Counter(poll.sent)
    assert sent == Counter(ids.eids(range(1, 7)))


def _blocked(engine: Engine) -> bool:
    with engine.connect() as conn:
        waiting = conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


# --------------------------------------------------------------------------------------------
# Command line and task


def _forget_configuration() -> None:
    if worker_db.get_engine.cache_info().currsize:
        worker_db.get_engine().dispose()
    worker_db.get_engine.cache_clear()
    worker_db._sessionmaker.cache_clear()
    get_settings.cache_clear()


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Set this process's environment; settings and the database engine follow it."""

    def apply(**env: str) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        _forget_configuration()

    yield apply
    _forget_configuration()


@pytest.fixture
def invoke(configure: Callable[..., None]) -> Callable[..., Result]:
    """Run ``grassroots poll`` in-process with this environment."""

    def run(*args: str, **env: str) -> Result:
        configure(**env)
        return CliRunner().invoke(poll_command, list(args))

    return run


def test_poll_command_reports_every_district_and_fails_when_one_needs_attention(
    invoke: Callable[..., Result], db: Db, ids: Ids, clever: FakeClever
) -> None:
    clever.add(ids.district(), ids.event(1))
    tokens = f"{ids.district()}:{ids.token()},{ids.district(1)}:tok-revoked"

    result = invoke(
        "--json", DATABASE_URL=db.url, CLEVER_API_BASE=clever.url, CLEVER_DISTRICT_TOKENS=tokens
    )

    assert [(r["district"], r["outcome"], r["cursor"]) for r in json.loads(result.stdout)] == [
        (ids.district(), "started", ids.eid(1)),
        (ids.district(1), "unauthorized", None),
    ]
    assert result.exit_code == 1
    assert result.stderr == (
        f"grassroots: 1 of 2 district(s) need attention: {ids.district(1)} (unauthorized)\n"
    )


def test_poll_command_refuses_a_district_without_a_token(
    invoke: Callable[..., Result], ids: Ids
) -> None:
    configured = f"{ids.district()}:{ids.token()}"

    misuse = invoke("--district", ids.district(1), CLEVER_DISTRICT_TOKENS=configured)
    unset = invoke(CLEVER_DISTRICT_TOKENS="")
    malformed = invoke(CLEVER_DISTRICT_TOKENS=ids.token())

    assert misuse.exit_code == 2 and f"no token for district {ids.district(1)}" in misuse.stderr
    assert unset.exit_code == 1
    assert unset.stderr == "grassroots: CLEVER_DISTRICT_TOKENS names no district to poll\n"
    assert malformed.exit_code == 1 and ids.token() not in malformed.stderr


def test_poll_task_has_a_stable_name_and_polls_the_districts_of_its_environment(
    configure: Callable[..., None], db: Db, ids: Ids, clever: FakeClever
) -> None:
    clever.add(ids.district(), ids.event(1))
    configure(
        DATABASE_URL=db.url,
        CLEVER_API_BASE=clever.url,
        CLEVER_DISTRICT_TOKENS=f"{ids.district()}:{ids.token()}",
    )

    outcomes = poll_task.apply().get()

    assert (poll_task.name, ROUTES[poll_task.name]) == ("grassroots.poll", {"queue": "maintenance"})
    assert outcomes == {ids.district(): "started"}
    assert db.cursor(ids.district()).cursor == ids.eid(1)
