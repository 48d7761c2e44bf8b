"""``grassroots run`` refuses, before it makes or starts anything, a port it cannot have; and it
keeps the secrets it generates in files that are its owner's only from their creation, saying
where they are, never what they are. (tests/test_run.py runs the whole stack.)"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import grassroots, tree
from tests.support.stack import OPS_TOKEN, spare_port
from worker import listeners, run
from worker.settings import home_secrets, load_settings


def other_ports(*given: str) -> list[str]:
    """Spare ports for the listeners of `grassroots run` a test does not choose."""
    options = [o for o in ("--port", "--ops-port", "--flower-port") if o not in given]
    return [word for option in options for word in (option, str(spare_port()))]


@pytest.fixture
def taken() -> Iterator[int]:
    """A port something listens on, and answers nothing (not Redis either)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_run_refuses_a_taken_receiver_port_before_starting_anything(
    tmp_path: Path, taken: int
) -> None:
    result = grassroots(tmp_path, "run", "--port", str(taken), *other_ports("--port"))

    assert result.returncode == 1
    assert result.stderr == (
        f"grassroots: port {taken} (the receiver) is already in use on 127.0.0.1: another"
        " `grassroots run` may be running; stop it, or pick another port with --port\n"
    )
    assert result.stdout == ""
    assert tree(tmp_path) == []


def test_run_refuses_a_taken_flower_port_before_starting_anything(
    tmp_path: Path, taken: int
) -> None:
    result = grassroots(tmp_path, "run", "--flower-port", str(taken), *other_ports("--flower-port"))

    assert result.returncode == 1
    assert result.stderr == (
        f"grassroots: port {taken} (Flower) is already in use on 127.0.0.1: another"
        " `grassroots run` may be running; stop it, or pick another port with --flower-port\n"
    )
    assert result.stdout == ""
    assert tree(tmp_path) == []


def test_run_refuses_a_taken_ops_port_before_starting_anything(tmp_path: Path, taken: int) -> None:
    result = grassroots(tmp_path, "run", "--ops-port", str(taken), *other_ports("--ops-port"))

    assert result.returncode == 1
    assert result.stderr == (
        f"grassroots: port {taken} (the ops API and console) is already in use on 127.0.0.1:"
        " another `grassroots run` may be running; stop it, or pick another port with --ops-port\n"
    )
    assert tree(tmp_path) == []


def test_run_refuses_a_broker_port_taken_by_something_that_is_not_redis(
    tmp_path: Path, taken: int
) -> None:
    result = grassroots(tmp_path, "run", *other_ports(), BROKER_URL=f"redis://127.0.0.1:{taken}/0")

    assert result.returncode == 1
    assert result.stderr == (
        f"grassroots: port {taken} (BROKER_URL) is taken by something that does not answer as"
        " Redis, so no private redis-server can start there: stop it, or set BROKER_URL to"
        " another port\n"
    )
    assert tree(tmp_path) == []


@pytest.mark.parametrize(
    ("one", "other"),
    [("--port", "--flower-port"), ("--port", "--ops-port"), ("--ops-port", "--flower-port")],
)
def test_the_receiver_ops_listener_and_flower_cannot_share_a_port(
    tmp_path: Path, one: str, other: str
) -> None:
    port = str(spare_port())

    result = grassroots(tmp_path, "run", one, port, other, port, *other_ports(one, other))

    assert result.returncode == 2
    assert "--port, --ops-port and --flower-port must differ" in result.stderr
    assert tree(tmp_path) == []


def test_without_ops_port_the_ops_listener_takes_the_next_port_or_any_free_one(
    taken: int,
) -> None:
    free = next(p for p in iter(spare_port, 0) if run._port_problem("127.0.0.1", p + 1) is None)
    assert run.free_ops_port(free, flower_port=5555) == free + 1
    # Taken (another stack on the defaults?), or Flower's: another, free one.
    for port, flower in ((taken - 1, 5555), (free, free + 1)):
        chosen = run.free_ops_port(port, flower_port=flower)
        assert chosen not in (port, port + 1, flower)
        assert run._port_problem("127.0.0.1", chosen) is None


@pytest.fixture
def no_chmod(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A umask that takes nothing away, and no chmod: a secret file is 600 only if it was made
    so, not written readable and narrowed after."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a secret file was chmod-ed after it was written")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(Path, "chmod", refuse)
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_secrets_are_generated_mode_600_and_their_values_never_printed(
    tmp_path: Path,
    no_chmod: None,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env: dict[str, str] = {}

    assert run._stack_secrets(tmp_path, env) is None

    secret = (tmp_path / "webhook-secret").read_text().strip()
    token = (tmp_path / "ops-token").read_text().strip()
    flower = (tmp_path / "flower-basic-auth").read_text().strip()
    assert env == {"WEBHOOK_SECRETS": secret, "OPS_TOKEN": token, "FLOWER_BASIC_AUTH": flower}
    for name in ("webhook-secret", "ops-token", "flower-basic-auth"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert out == (
        f"run | generated the webhook secret: {tmp_path / 'webhook-secret'} (mode 600)\n"
        f"run | generated the ops token: {tmp_path / 'ops-token'} (mode 600)\n"
        f"run | generated the flower basic auth: {tmp_path / 'flower-basic-auth'} (mode 600)\n"
    )
    # Strong enough for the settings, which refuse a weak one.
    monkeypatch.setenv("GRASSROOTS_HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.flower_basic_auth == flower and flower.startswith("grassroots:")
    assert (settings.ops_token, settings.webhook_secrets) == (token, (secret,))


def test_a_later_run_uses_the_kept_secrets_unless_the_environment_sets_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run._stack_secrets(tmp_path, {})
    kept = (tmp_path / "webhook-secret").read_text().strip()
    flower = (tmp_path / "flower-basic-auth").read_text().strip()
    capsys.readouterr()

    again: dict[str, str] = {"OPS_TOKEN": OPS_TOKEN}
    assert run._stack_secrets(tmp_path, again) is None

    assert again == {"WEBHOOK_SECRETS": kept, "OPS_TOKEN": OPS_TOKEN, "FLOWER_BASIC_AUTH": flower}
    assert capsys.readouterr().out == (
        f"run | webhook secret: {tmp_path / 'webhook-secret'}\nrun | ops token: from OPS_TOKEN\n"
        f"run | flower basic auth: {tmp_path / 'flower-basic-auth'}\n"
    )


def test_a_private_redis_password_is_generated_once_and_its_url_kept_for_the_commands(
    tmp_path: Path, no_chmod: None, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"BROKER_URL": "redis://127.0.0.1:6390/2"}
    password = run._private_password(tmp_path, env)

    assert password == (tmp_path / "redis-password").read_text().strip()
    assert len(password) >= 32
    assert env["BROKER_URL"] == f"redis://:{password}@127.0.0.1:6390/2"
    for name in ("redis-password", "broker-url"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert (tmp_path / "broker-url").read_text().strip() == env["BROKER_URL"]
    assert password not in capsys.readouterr().out
    # The commands run from here take BROKER_URL from the home while it is unset.
    assert home_secrets(tmp_path, {})["BROKER_URL"] == env["BROKER_URL"]
    assert "BROKER_URL" not in home_secrets(tmp_path, {"BROKER_URL": "redis://elsewhere/0"})

    # Again: the same password. A URL with a password of its own keeps it.
    assert run._private_password(tmp_path, {}) == password
    own = {"BROKER_URL": "redis://:p%40ss%22word@127.0.0.1:6390/0"}
    assert run._private_password(tmp_path, own) == 'p@ss"word'
    assert (tmp_path / "broker-url").read_text().strip() == own["BROKER_URL"]
    assert run.redis_config('p@ss"word') == 'requirepass "p@ss\\"word"\n'


def test_make_run_passes_its_arguments_to_grassroots_run() -> None:
    """`make run ARGS="--port P --flower-port Q"`: the ports reach `grassroots run` (dry run)."""
    root = Path(__file__).resolve().parent.parent
    planned = subprocess.run(
        ["make", "-n", "-C", str(root), "run", "ARGS=--port 8100 --flower-port 5600"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ".venv/bin/grassroots run --port 8100 --flower-port 5600\n" in planned.stdout


def test_the_recorded_address_of_a_wildcard_listener_is_one_a_client_here_reaches() -> None:
    assert listeners.base_url("0.0.0.0", 8100) == "http://127.0.0.1:8100"  # noqa: S104
    assert listeners.base_url("::", 8100) == "http://[::1]:8100"
    assert listeners.base_url("127.0.0.2", 8100) == "http://127.0.0.2:8100"
