"""The poller's tests' harness (``tests/test_poller*.py``): a local Clever-shaped server, each
test's own districts, tokens and event ids, and ``poll_district`` collecting what it sends to the
workers. Passes commit, so the tests share one database per backend for each module, each test
with its own districts and event ids. A pytest plugin (``tests/conftest.py``), for its fixtures.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from models import PollCursor, RosterEvent
from tests.support.databases import PgDatabases, fresh_sqlite
from tests.support.fake_clever import FakeClever
from tests.support.stack import clever_event
from worker.clever import DistrictToken
from worker.db import make_engine, session_scope
from worker.poller import PollOptions, PollResult, poll_district

FAST = PollOptions(
    page_size=2, attempts=4, backoff=0.01, backoff_max=0.05, timeout=httpx.Timeout(2.0)
)
_tags = (f"{n:04x}" for n in itertools.count(0xC000))


@dataclass(frozen=True)
class Ids:
    """One test's own districts, tokens and events (Clever-looking 24-character ids)."""

    tag: str

    def district(self, k: int = 0) -> str:
        return f"{self.tag}{k:04x}" + "d157" * 4

    def token(self, k: int = 0) -> str:
        return f"tok-{self.tag}-{k}-9f3ac1e2"

    def eid(self, n: int) -> str:
        return f"{self.tag}{n:04x}" + "e" * 16

    def event(self, n: int, k: int = 0) -> dict[str, Any]:
        """A users.updated event of district ``k``, ``created`` in feed order."""
        return clever_event(
            self.eid(n),
            "users.updated",
            {"id": f"{self.tag}{n:04x}" + "a" * 16, "district": self.district(k), "roles": {}},
            created=f"2026-10-01T00:{n // 60:02d}:{n % 60:02d}Z",
        )

    def eids(self, numbers: Iterable[int]) -> list[str]:
        return [self.eid(n) for n in numbers]


@dataclass
class Db:
    engine: Engine
    url: str

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.engine)

    def inbox(self, *districts: str) -> list[str]:
        with self.session() as s:
            return sorted(
                s.scalars(select(RosterEvent.id).where(RosterEvent.district_id.in_(districts)))
            )

    def payload(self, event_id: str) -> dict[str, Any]:
        with self.session() as s:
            stored = s.get(RosterEvent, event_id)
            assert stored is not None
            return stored.payload

    def cursor(self, district: str) -> PollCursor:
        with self.session() as s:
            row = s.get(PollCursor, district)
            assert row is not None
            return row


@pytest.fixture(scope="module")
def postgresql_db(pg_databases: PgDatabases) -> Iterator[Db]:
    url = pg_databases.new()
    engine = make_engine(url)
    yield Db(engine, url)
    engine.dispose()


@pytest.fixture(scope="module")
def sqlite_db(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Db]:
    url = fresh_sqlite(sqlite_template, tmp_path_factory.mktemp("poller"))
    engine = make_engine(url)
    yield Db(engine, url)
    engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest) -> Db:
    chosen: Db = request.getfixturevalue(f"{request.param}_db")
    return chosen


@pytest.fixture
def ids() -> Ids:
    return Ids(next(_tags))


@pytest.fixture
def clever(ids: Ids) -> Iterator[FakeClever]:
    with FakeClever() as server:
        server.district(ids.district(), ids.token())
        yield server


@dataclass
class Poller:
    """``poll_district`` against the fake, collecting what it sends to the workers."""

    db: Db
    ids: Ids
    options: PollOptions
    sent: list[str] = field(default_factory=list)

    def enqueue(self, event_ids: Any) -> int:
        self.sent.extend(event_ids)
        return len(event_ids)

    def __call__(
        self, k: int = 0, *, district: str | None = None, token: str | None = None, **kw: Any
    ) -> PollResult:
        district = district or self.ids.district(k)
        return poll_district(
            self.db.session,
            DistrictToken(district, token or self.ids.token(k)),
            options=self.options,
            enqueue=self.enqueue,
            **kw,
        )


@pytest.fixture
def poll(db: Db, ids: Ids, clever: FakeClever) -> Poller:
    return Poller(db, ids, replace(FAST, base_url=clever.url))


def after(clever: FakeClever, district: str) -> list[str | None]:
    """What each request of the district asked to start after (None: from the start)."""
    return [r.query.get("starting_after") for r in clever.requests(district)]
