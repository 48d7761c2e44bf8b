"""The app's environment for in-process HTTP tests: settings, engine and Celery broker follow
the variables a test sets, and are put back after it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import httpx
import pytest
import redis

from worker import db
from worker.celery_app import app as celery_app
from worker.settings import get_settings

# Nothing listens on port 1: connecting fails at once.
CLOSED_BROKER = "redis://127.0.0.1:1/0"
CLOSED_DATABASE = "postgresql://postgres@127.0.0.1:1/x"


def _reset_caches() -> None:
    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    db._sessionmaker.cache_clear()
    db.get_engine.cache_clear()
    get_settings.cache_clear()


class Configure(Protocol):
    def __call__(self, **env: str | None) -> None: ...


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """Set the app's environment; settings, engine and Celery broker follow it."""

    def apply(**env: str | None) -> None:
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        _reset_caches()
        # The Celery app reads BROKER_URL once, at import: point it (and its connection pools,
        # built on first use) at the broker the settings now name.
        monkeypatch.setattr(celery_app.conf, "broker_url", get_settings().broker_url)
        monkeypatch.setattr(celery_app, "_pool", None)
        monkeypatch.setattr(celery_app.amqp, "_producer_pool", None)

    yield apply
    _reset_caches()


@pytest.fixture
def broker(tmp_path: Path, configure: Configure, database_url: str) -> Iterator[redis.Redis]:
    """A private Redis as the app's broker, beside a fresh database; a client to read it with."""
    # Imported here: the stack's module loads a plugin module, which pytest must rewrite first.
    from tests.support.stack import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    configure(DATABASE_URL=database_url, BROKER_URL=server.url)
    try:
        with redis.Redis.from_url(server.url) as client:
            yield client
    finally:
        server.stop()


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    """Every error the HTTP side answers is JSON with a machine code and a message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "message"}
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["error"] == code
