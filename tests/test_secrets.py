"""Configured secrets have a floor (SPEC §5.7): a webhook key of 24 bytes once decoded (the
Standard Webhooks recommendation), an ops token of 24 characters, a Flower password of 16. A
weaker one is refused before anything starts, by a message that names the variable, never its
value."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.support.cli import grassroots
from tests.support.stack import FLOWER_BASIC_AUTH, OPS_TOKEN, SECRET
from worker.settings import ConfigError, Settings, load_settings
from worker.signing import generate_secret


def key_of(size: int) -> str:
    return "whsec_" + base64.b64encode(b"k" * size).decode()


WEAK = [
    (
        "WEBHOOK_SECRETS",
        key_of(23),
        "WEBHOOK_SECRETS: secret 1 holds a 23-byte key: each must hold at least 24 bytes once"
        " decoded (`grassroots run` makes 32)",
    ),
    (
        "WEBHOOK_SECRETS",
        f"{SECRET},{key_of(16)}",
        "WEBHOOK_SECRETS: secret 2 holds a 16-byte key: each must hold at least 24 bytes once"
        " decoded (`grassroots run` makes 32)",
    ),
    (
        "WEBHOOK_SECRETS",
        "whsec_not*base64-at-all",
        "WEBHOOK_SECRETS: secret 1: webhook secret is not valid base64 (expected whsec_<base64>)",
    ),
    ("OPS_TOKEN", "x" * 23, "OPS_TOKEN: must be at least 24 characters"),
    (
        "FLOWER_BASIC_AUTH",
        "ops:fifteen-chars",
        "FLOWER_BASIC_AUTH: the password of credential 1 must be at least 16 characters",
    ),
    (
        "FLOWER_BASIC_AUTH",
        "ops-without-a-password",
        "FLOWER_BASIC_AUTH: must be user:password, neither empty (several: comma-separated)",
    ),
]


@pytest.mark.parametrize(("name", "value", "message"), WEAK)
def test_a_weak_secret_is_refused_naming_the_variable_never_the_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError) as refused:
        load_settings()

    assert str(refused.value) == message
    for part in value.removeprefix("whsec_").split(","):
        assert part.split(":")[-1] not in str(refused.value)


def test_secrets_at_the_floor_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "WEBHOOK_SECRETS": f"{key_of(24)}, {generate_secret()}",
        "OPS_TOKEN": "x" * 24,
        # Spaces around a comma are not part of a credential (Flower compares them as given).
        "FLOWER_BASIC_AUTH": "ops:" + "p" * 16 + ", bob:" + "q" * 20,
    }.items():
        monkeypatch.setenv(name, value)

    settings = load_settings()

    assert len(settings.webhook_secrets) == 2
    assert settings.flower_basic_auth == "ops:" + "p" * 16 + ",bob:" + "q" * 20


def test_the_test_suite_s_own_secrets_are_strong_enough() -> None:
    Settings(webhook_secrets=(SECRET,), ops_token=OPS_TOKEN, flower_basic_auth=FLOWER_BASIC_AUTH)


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["flower"], ["status"]])
def test_every_command_refuses_to_start_with_a_weak_secret(
    tmp_path: Path, command: list[str]
) -> None:
    result = grassroots(tmp_path, *command, OPS_TOKEN="short-ops-token")

    assert result.returncode == 1
    assert result.stderr == "grassroots: OPS_TOKEN: must be at least 24 characters\n"
    assert "short-ops-token" not in result.stdout + result.stderr
