"""Settings: read from the environment once per process, in one typed object (SPEC §5.7, and the
operational extras the README's configuration table lists). Nothing else reads the environment
for a setting.

A value we cannot use is a ``ConfigError`` naming the variable; secrets are never echoed in it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.signing import decode_secret

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_CLEVER_API_BASE = "https://api.clever.com"
# Where `grassroots run` keeps a stack's state, relative to the current directory by default.
DEFAULT_HOME = "var"
DATABASE_FILE = "grassroots.db"
# The secrets `grassroots run` generates and keeps under the home, by the variable each stands
# in for when the environment leaves it unset.
HOME_SECRETS = {
    "WEBHOOK_SECRETS": "webhook-secret",
    "OPS_TOKEN": "ops-token",
    "FLOWER_BASIC_AUTH": "flower-basic-auth",
    # Only when `grassroots run` started a private redis: its URL, with the password it requires.
    "BROKER_URL": "broker-url",
}
# The least a configured secret may hold: anything shorter can be guessed, or brute-forced offline
# from one signed request. 24 bytes of webhook key is the Standard Webhooks recommendation.
MIN_WEBHOOK_KEY_BYTES = 24
MIN_OPS_TOKEN_CHARS = 24
MIN_FLOWER_PASSWORD_CHARS = 16
# Their values never appear in an error message.
SECRET_VARIABLES = frozenset(
    {
        "WEBHOOK_SECRETS",
        "OPS_TOKEN",
        "FLOWER_BASIC_AUTH",
        "CLEVER_DISTRICT_TOKENS",
        "DATABASE_URL",
        "BROKER_URL",
    }
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


# Comma-separated in the environment (not JSON, which pydantic-settings expects of a list).
CommaList = Annotated[tuple[str, ...], NoDecode]


def _env(name: str) -> Any:
    return Field(validation_alias=AliasChoices(name))


class Settings(BaseSettings):
    """Every setting, by the name of its environment variable. Unset or blank: the default."""

    model_config = SettingsConfigDict(env_ignore_empty=True, frozen=True, extra="ignore")

    home: Annotated[Path, _env("GRASSROOTS_HOME")] = Path(DEFAULT_HOME)
    # Empty: the SQLite database in the home.
    database_url: Annotated[str, _env("DATABASE_URL")] = ""
    broker_url: Annotated[str, _env("BROKER_URL")] = DEFAULT_BROKER_URL
    webhook_secrets: Annotated[CommaList, _env("WEBHOOK_SECRETS")] = ()
    ops_token: Annotated[str | None, _env("OPS_TOKEN")] = None
    clever_api_base: Annotated[str, _env("CLEVER_API_BASE")] = DEFAULT_CLEVER_API_BASE
    clever_district_tokens: Annotated[CommaList, _env("CLEVER_DISTRICT_TOKENS")] = ()
    retention_days: Annotated[int, _env("RETENTION_DAYS")] = 30
    removal_brake_percent: Annotated[float, _env("REMOVAL_BRAKE_PERCENT"), Field(ge=0)] = 10.0
    lock_timeout_ms: Annotated[int, _env("LOCK_TIMEOUT_MS"), Field(ge=1)] = 5000
    task_max_retries: Annotated[int, _env("TASK_MAX_RETRIES"), Field(ge=0)] = 8
    retry_backoff_max: Annotated[int, _env("RETRY_BACKOFF_MAX"), Field(ge=1)] = 600
    flower_basic_auth: Annotated[str | None, _env("FLOWER_BASIC_AUTH")] = None
    # Empty: long enough for any retry countdown and the run after it (``visibility_timeout``).
    broker_visibility_timeout: Annotated[
        int | None, _env("BROKER_VISIBILITY_TIMEOUT"), Field(ge=1)
    ] = None
    relay_interval: Annotated[float, _env("RELAY_INTERVAL"), Field(ge=0.1)] = 5.0
    relay_after_seconds: Annotated[float, _env("RELAY_AFTER_SECONDS"), Field(ge=0)] = 30.0
    poll_interval: Annotated[float, _env("POLL_INTERVAL"), Field(ge=1)] = 60.0
    # Seconds between scheduled roster syncs of each district with a token; 0 turns them off.
    sync_interval: Annotated[float, _env("SYNC_INTERVAL"), Field(ge=0)] = 86400.0
    exit_batch_size: Annotated[int, _env("EXIT_BATCH_SIZE"), Field(ge=1)] = 1000
    log_level: Annotated[str, _env("LOG_LEVEL")] = "INFO"
    # A task running this long is stopped (soft: an exception it can clean up after, 30 s
    # before the hard limit, which ends its process): one hung task never holds a pool slot.
    task_time_limit: Annotated[float, _env("TASK_TIME_LIMIT"), Field(ge=60)] = 1800.0
    # A statement running this long is cancelled by Postgres (0: never); the task retries.
    statement_timeout_ms: Annotated[int, _env("STATEMENT_TIMEOUT_MS"), Field(ge=0)] = 300_000
    # Beat sends the heartbeat task this often; /readyz fails once the last one a worker ran is
    # older than HEARTBEAT_MAX_AGE (0: never).
    heartbeat_interval: Annotated[float, _env("HEARTBEAT_INTERVAL"), Field(ge=1)] = 30.0
    heartbeat_max_age: Annotated[float, _env("HEARTBEAT_MAX_AGE"), Field(ge=0)] = 300.0

    @field_validator("webhook_secrets", "clever_district_tokens", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _strong_webhook_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Each secret is named by its position in the list, never by its value.
        for n, secret in enumerate(value, 1):
            try:
                key = decode_secret(secret)
            except ValueError as exc:
                raise ValueError(f"secret {n}: {exc}") from None
            if len(key) < MIN_WEBHOOK_KEY_BYTES:
                raise ValueError(
                    f"secret {n} holds a {len(key)}-byte key: each must hold at least"
                    f" {MIN_WEBHOOK_KEY_BYTES} bytes once decoded (`grassroots run` makes 32)"
                )
        return value

    @field_validator("ops_token")
    @classmethod
    def _strong_ops_token(cls, value: str | None) -> str | None:
        if value is not None and len(value) < MIN_OPS_TOKEN_CHARS:
            raise ValueError(f"must be at least {MIN_OPS_TOKEN_CHARS} characters")
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _strong_flower_credentials(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # Flower compares "user:password" as given: spaces around a comma would be part of it.
        credentials = [credential.strip() for credential in value.split(",")]
        for n, credential in enumerate(credentials, 1):
            user, _, password = credential.partition(":")
            if not user or not password:
                raise ValueError("must be user:password, neither empty (several: comma-separated)")
            if len(password) < MIN_FLOWER_PASSWORD_CHARS:
                raise ValueError(
                    f"the password of credential {n} must be at least"
                    f" {MIN_FLOWER_PASSWORD_CHARS} characters"
                )
        return ",".join(credentials)

    @field_validator("retention_days")
    @classmethod
    def _some_retention(cls, value: int) -> int:
        # 0 would let the next purge strip what a conversion removed minutes ago: `grassroots
        # restore` would have nothing to bring back, and a mistaken removal no window to undo it.
        if value < 1:
            raise ValueError(
                "must be at least 1 (days a conversion stays restorable before the purge)"
            )
        return value

    @field_validator("clever_api_base")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError("must be a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
        return level

    @model_validator(mode="after")
    def _database_in_home(self) -> Settings:
        url = self.database_url or default_database_url(self.home)
        object.__setattr__(self, "database_url", normalize_database_url(url))
        return self

    @property
    def home_database(self) -> Path | None:
        """The SQLite file under the home, when DATABASE_URL names no other database."""
        if self.database_url != default_database_url(self.home):
            return None
        return self.home / DATABASE_FILE

    @property
    def visibility_timeout(self) -> int:
        """Seconds before Redis hands an unacknowledged task to another worker: longer than any
        retry countdown and the run after it, or a task waiting out its countdown, or still
        running, would run twice."""
        if self.broker_visibility_timeout is not None:
            return self.broker_visibility_timeout
        return max(3600, 2 * self.retry_backoff_max + int(self.task_time_limit) + 600)


def _variable(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    assert isinstance(alias, AliasChoices)
    name = alias.choices[0]
    assert isinstance(name, str)
    return name


# Every variable the application reads. A test holds docker-compose.yml to this list.
ENVIRONMENT_VARIABLES = tuple(_variable(field) for field in Settings.model_fields)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "settings"
        message = error["msg"].removeprefix("Value error, ")
        if name in SECRET_VARIABLES or not error["loc"]:
            problems.append(f"{name}: {message}")
        else:
            problems.append(f"{name}: {message}, got {error['input']!r}")
    return "; ".join(problems)


def load_settings() -> Settings:
    """The settings, from the process environment."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


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
