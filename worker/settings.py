"""Settings, read from the environment once per process (SPEC §5.7)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
# Where `grassroots run` keeps a stack's state, relative to the current directory by default.
DEFAULT_HOME = "var"
DATABASE_FILE = "grassroots.db"
# The secrets `grassroots run` generates and keeps under the home, by the variable each stands
# in for when the environment leaves it unset.
HOME_SECRETS = {"WEBHOOK_SECRETS": "webhook-secret", "OPS_TOKEN": "ops-token"}

# Every variable the application reads (SPEC §5.7, plus the operational extras documented in the
# README). A test holds docker-compose.yml to this list.
ENVIRONMENT_VARIABLES = (
    "DATABASE_URL",
    "BROKER_URL",
    "WEBHOOK_SECRETS",
    "OPS_TOKEN",
    "CLEVER_API_BASE",
    "CLEVER_DISTRICT_TOKENS",
    "RETENTION_DAYS",
    "REMOVAL_BRAKE_PERCENT",
    "LOCK_TIMEOUT_MS",
    "TASK_MAX_RETRIES",
    "RETRY_BACKOFF_MAX",
    "FLOWER_BASIC_AUTH",
    # operational extras (README "Configuration")
    "BROKER_VISIBILITY_TIMEOUT",
    "RELAY_INTERVAL",
    "RELAY_AFTER_SECONDS",
    "POLL_INTERVAL",
    "EXIT_BATCH_SIZE",
    "LOG_LEVEL",
    "GRASSROOTS_HOME",
)


class ConfigError(ValueError):
    """An environment variable holds a value we cannot use."""


def normalize_database_url(url: str) -> str:
    """Accept ``postgres://`` and ``postgresql://`` as written; the driver is psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def default_database_url(home: Path) -> str:
    return f"sqlite:///{home / DATABASE_FILE}"


def home_secrets(home: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The secrets the stack at ``home`` supplies for the variables ``environ`` leaves unset:
    what `grassroots run` generated there, read from its files. The command line puts them in
    its environment, and `grassroots run` in its children's."""
    found = {}
    for name, file in HOME_SECRETS.items():
        if environ.get(name):
            continue
        path = home / file
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(
                f"{name} is not set and {path} cannot be read: {exc.strerror}"
            ) from exc
        if value:
            found[name] = value
    return found


def _int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _list(name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in os.environ.get(name, "").split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str
    webhook_secrets: tuple[str, ...] = ()
    ops_token: str | None = None
    clever_api_base: str = "https://api.clever.com"
    clever_district_tokens: tuple[str, ...] = ()
    retention_days: int = 30
    removal_brake_percent: float = 10.0
    lock_timeout_ms: int = 5000
    task_max_retries: int = 8
    retry_backoff_max: int = 600
    flower_basic_auth: str | None = None
    relay_interval: float = 5.0
    relay_after_seconds: float = 30.0
    poll_interval: float = 60.0
    exit_batch_size: int = 1000
    home: Path = Path(DEFAULT_HOME)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def home_database(self) -> Path | None:
        """The SQLite file under the home, when DATABASE_URL names no other database."""
        if self.database_url != default_database_url(self.home):
            return None
        return self.home / DATABASE_FILE


def load_settings() -> Settings:
    home = Path(os.environ.get("GRASSROOTS_HOME") or DEFAULT_HOME)
    return Settings(
        database_url=normalize_database_url(
            os.environ.get("DATABASE_URL") or default_database_url(home)
        ),
        broker_url=os.environ.get("BROKER_URL") or DEFAULT_BROKER_URL,
        webhook_secrets=_list("WEBHOOK_SECRETS"),
        ops_token=os.environ.get("OPS_TOKEN") or None,
        clever_api_base=(os.environ.get("CLEVER_API_BASE") or "https://api.clever.com").rstrip("/"),
        clever_district_tokens=_list("CLEVER_DISTRICT_TOKENS"),
        retention_days=_int("RETENTION_DAYS", 30),
        removal_brake_percent=_float("REMOVAL_BRAKE_PERCENT", 10.0),
        lock_timeout_ms=_int("LOCK_TIMEOUT_MS", 5000, minimum=1),
        task_max_retries=_int("TASK_MAX_RETRIES", 8),
        retry_backoff_max=_int("RETRY_BACKOFF_MAX", 600, minimum=1),
        flower_basic_auth=os.environ.get("FLOWER_BASIC_AUTH") or None,
        relay_interval=_float("RELAY_INTERVAL", 5.0, minimum=0.1),
        relay_after_seconds=_float("RELAY_AFTER_SECONDS", 30.0),
        poll_interval=_float("POLL_INTERVAL", 60.0, minimum=1.0),
        exit_batch_size=_int("EXIT_BATCH_SIZE", 1000, minimum=1),
        home=home,
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
