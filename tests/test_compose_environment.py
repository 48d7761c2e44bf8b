"""docker-compose.yml's variables and secrets (SPEC §5.7, §7): every service sets only variables the
application reads and every process gets every setting, each overridable by its own name with the
SPEC's defaults, and compose refuses to start without each secret, which has no default.
"""

from __future__ import annotations

import re

import pytest
from celery import Celery

from tests.support.compose import (
    COMPOSE_FILE,
    OUR_SERVICES,
    PROCESSES,
    ROOT,
    SECRETS,
    MissingVariable,
    compose,
    environment,
    resolved,
    service,
    spec_variables,
)
from worker.celery_app import build_config, check_safe
from worker.settings import ENVIRONMENT_VARIABLES, load_settings


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_service_sets_only_variables_the_application_reads(name: str) -> None:
    unknown = set(environment(name)) - set(ENVIRONMENT_VARIABLES)
    assert not unknown, f"{name} sets {sorted(unknown)}, which grassroots never reads"


def test_application_reads_every_spec_variable() -> None:
    variables = set(spec_variables())
    # §5.7 names TASK_TIME_LIMIT and STATEMENT_TIMEOUT_MS too.
    assert len(variables) == 15, sorted(variables)
    missing = variables - set(ENVIRONMENT_VARIABLES)
    assert not missing, f"grassroots never reads {sorted(missing)}"


def readme_settings() -> list[str]:
    """The variables of the README's configuration table."""
    section = (ROOT / "README.md").read_text().split("## Configuration", 1)[1].split("\n## ")[0]
    return re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", section, re.M)


def test_the_readme_table_is_every_setting_the_application_reads() -> None:
    assert sorted(readme_settings()) == sorted(ENVIRONMENT_VARIABLES)


@pytest.mark.parametrize("name", PROCESSES)
def test_every_setting_reaches_every_process(name: str) -> None:
    settings = {*spec_variables(), *readme_settings(), *ENVIRONMENT_VARIABLES}
    missing = settings - set(environment(name))
    assert not missing, f"{name} does not get {sorted(missing)}"


def test_each_variable_is_overridable_by_its_own_name_and_secrets_have_no_default() -> None:
    for key, value in service("receiver")["environment"].items():
        if key in ("DATABASE_URL", "BROKER_URL"):
            continue  # made of POSTGRES_PASSWORD and REDIS_PASSWORD, shared with their servers
        operator = ":?" if key in SECRETS else ":-"
        assert value.startswith(f"${{{key}{operator}") and value.endswith("}"), f"{key}: {value}"
    url = service("receiver")["environment"]["DATABASE_URL"]
    assert "${POSTGRES_PASSWORD:?" in url
    assert "${REDIS_PASSWORD:?" in service("receiver")["environment"]["BROKER_URL"]
    assert service("postgres")["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )


def test_the_secrets_are_the_only_variables_compose_requires() -> None:
    required = re.findall(r"\$\{([A-Za-z_]\w*):?\?", COMPOSE_FILE.read_text())
    assert set(required) == set(SECRETS)


@pytest.mark.parametrize("secret", sorted(SECRETS))
@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_compose_refuses_to_start_without_each_secret(secret: str, value: str | None) -> None:
    without = {k: v for k, v in SECRETS.items() if k != secret}
    if value is not None:
        without[secret] = value
    # The message compose prints says what to set.
    with pytest.raises(MissingVariable, match=f"^{secret}: set {secret}\\b"):
        resolved(compose(), without)


def test_secrets_come_from_the_environment_and_clever_tokens_default_to_none() -> None:
    for name in PROCESSES:
        env = environment(name)
        assert env["CLEVER_DISTRICT_TOKENS"] == "", "Clever tokens default to none (no polling)"
        for key in ("WEBHOOK_SECRETS", "OPS_TOKEN", "FLOWER_BASIC_AUTH"):
            assert env[key] == SECRETS[key]


def test_defaults_are_the_spec_defaults_and_pass_the_worker_safety_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in environment("worker").items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.database_url == (
        "postgresql+psycopg://grassroots:pg-password@postgres:5432/grassroots"
    )
    assert settings.broker_url == "redis://:redis-password-for-tests@redis:6379/0"
    assert settings.clever_api_base == "https://api.clever.com"
    assert settings.clever_district_tokens == ()
    assert settings.retention_days == 30
    assert settings.removal_brake_percent == 10
    assert settings.lock_timeout_ms == 5000
    assert settings.task_max_retries == 8
    assert settings.retry_backoff_max == 600
    assert settings.task_time_limit == 1800
    assert settings.statement_timeout_ms == 300_000
    assert (settings.heartbeat_interval, settings.heartbeat_max_age) == (30, 300)
    assert settings.log_level == "INFO"
    app = Celery("compose-defaults", set_as_current=False)
    app.conf.update(build_config(settings))
    check_safe(app.conf, settings)
