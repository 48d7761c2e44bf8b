"""docker-compose.yml's services (SPEC §7): one image built here, every command one the installed
CLI accepts, what is published, how the processes reach Postgres and Redis and wait for the
migration, and the healthchecks, run against a real receiver and the redis service's own entrypoint.

Neither Docker nor compose is needed: the file is interpolated here by compose's rules
(``tests/support/compose.py``) and every command is run through the installed ``grassroots``.
The secrets and environment are in ``test_compose_environment.py``, the Compose specification's
model in ``test_compose_spec.py``, the monitoring profile in ``test_compose_monitoring.py`` and
the Dockerfile in ``test_image.py``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest
import redis

from tests.support.compose import (
    EVERY_INTERFACE,
    MONITORING,
    OUR_SERVICES,
    PROCESSES,
    SECRETS,
    command,
    compose,
    environment,
    healthcheck_code,
    resolved,
    service,
    split_command,
)
from tests.support.process_logs import register
from tests.support.stack import BIN, serving, spare_port, wait_until
from worker.cli import main as cli


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "FLOWER_"))}
    return subprocess.run(
        [str(BIN), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


# --- the services ----------------------------------------------------------------------------


def test_the_migration_and_the_four_processes_run_one_image_built_here() -> None:
    ours = {name for name, svc in compose()["services"].items() if "build" in svc}
    assert ours == set(OUR_SERVICES)
    assert {resolved(service(name)["build"]) for name in ours} == {"."}
    assert len({resolved(service(name)["image"]) for name in ours}) == 1


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_service_command_is_one_the_installed_cli_accepts(name: str) -> None:
    path, options = split_command(command(name))
    assert path, f"{name}: no subcommand in {command(name)}"
    help_run = run_cli(*path, *options, "--help")
    assert help_run.returncode == 0, f"grassroots {shlex.join(path)}: {help_run.stderr}"
    for option in (w.split("=", 1)[0] for w in options if w.startswith("--")):
        assert option in help_run.stdout, f"grassroots {shlex.join(path)} has no {option}"
    # --help is eager, so click never converted the values above: parse them for real.
    ctx = click.Context(cli, info_name="grassroots")
    cmd: click.Command = cli
    for word in path:
        assert isinstance(cmd, click.Group), f"{name}: {word!r} follows a command, not a group"
        found = cmd.get_command(ctx, word)
        assert found is not None, f"{name}: no command {word!r}"
        cmd = found
    assert not isinstance(cmd, click.Group), f"{name}: {shlex.join(path)} needs a subcommand"
    cmd.make_context(shlex.join(path), list(options), parent=ctx)


def test_receiver_serves_the_webhook_and_the_ops_api_on_two_listeners() -> None:
    path, options = split_command(command("receiver"))
    assert path == ["serve"]
    # Every interface of its container: beyond it, only what is published is reached.
    assert options == [
        *("--host", EVERY_INTERFACE, "--port", "8000"),
        *("--ops-host", EVERY_INTERFACE, "--ops-port", "8001"),
    ]


def published(name: str) -> list[str]:
    """A service's published ports, in the short form (``[HOST_IP:]PUBLISHED:TARGET``)."""
    ports = resolved(service(name).get("ports", []))
    assert all(isinstance(p, str) for p in ports), f"{name}: write ports in the short form"
    return [str(p) for p in ports]


def test_nothing_but_the_webhook_listener_is_published() -> None:
    assert published("receiver") == ["8000:8000"]
    # On loopback only, and only with the monitoring profile: Prometheus and Grafana.
    for name in compose()["services"]:
        if name not in ("receiver", *MONITORING):
            assert published(name) == [], f"{name} is published"
    # The ops listener, Flower and Redis are reached on the compose network.
    assert "8001:" not in str(published("receiver"))


def test_redis_requires_a_password_and_every_process_gives_it() -> None:
    assert service("redis")["secrets"] == ["redis_password"]
    assert compose()["secrets"]["redis_password"] == {"environment": "REDIS_PASSWORD"}
    for name in OUR_SERVICES:
        broker = urlsplit(environment(name)["BROKER_URL"])
        assert broker.password == SECRETS["REDIS_PASSWORD"], name


def test_flower_listens_beyond_loopback_so_it_requires_basic_auth() -> None:
    path, options = split_command(command("flower"))
    assert path == ["flower"]
    assert options == ["--address", EVERY_INTERFACE, "--port", "5555"]
    assert service("flower")["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")


def test_processes_reach_postgres_and_redis_by_their_service_names() -> None:
    for name in OUR_SERVICES:
        env = environment(name)
        database, broker = urlsplit(env["DATABASE_URL"]), urlsplit(env["BROKER_URL"])
        assert (database.scheme, database.hostname, database.port) == (
            "postgresql",
            "postgres",
            5432,
        )
        assert database.path == "/" + service("postgres")["environment"]["POSTGRES_DB"]
        assert database.username == service("postgres")["environment"]["POSTGRES_USER"]
        assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)


def test_redis_keeps_queued_tasks_on_disk_and_never_evicts_them() -> None:
    words = command("redis")
    # Its configuration from stdin first (the password), then these.
    assert words[:2] == ["redis-server", "-"]
    options = dict(zip(words[2::2], words[3::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert any(volume.endswith(":/data") for volume in service("redis")["volumes"])
    assert any(
        volume.endswith(":/var/lib/postgresql/data") for volume in service("postgres")["volumes"]
    )


def test_postgres_redis_receiver_and_flower_have_healthchecks() -> None:
    postgres = resolved(service("postgres")["healthcheck"]["test"])
    assert postgres[:2] == ["CMD", "pg_isready"]
    assert resolved(service("redis")["healthcheck"]["test"])[0] == "CMD-SHELL"
    for name, path in (("receiver", "/healthz"), ("flower", "/healthcheck")):
        port = command(name)[command(name).index("--port") + 1]
        assert f"http://127.0.0.1:{port}{path}'" in healthcheck_code(name)


def _redis_as_compose_runs_it(
    tmp_path: Path, password: str
) -> tuple[subprocess.Popen[bytes], int, Callable[[str], str]]:
    """The redis service's entrypoint and command for real, here: the image's entrypoint stands
    aside (``env``), its secret is a file of ours, and it listens on a spare loopback port."""
    secret = tmp_path / "redis_password"
    secret.write_text(password)  # as compose writes a secret from the environment
    port = spare_port()

    def here(script: str) -> str:
        script = script.replace("/run/secrets/redis_password", str(secret))
        return script.replace("docker-entrypoint.sh", "env").replace(
            "redis-cli ping", f"redis-cli -p {port} ping"
        )

    shell, flag, script, name = resolved(service("redis")["entrypoint"])
    words = [*command("redis"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    log = tmp_path / "redis.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [shell, flag, here(script), name, *words], stdout=out, stderr=subprocess.STDOUT
        )
    register("redis as compose runs it", log, proc)
    return proc, port, here


@pytest.mark.slow
def test_redis_as_compose_runs_it_requires_the_secrets_password_never_on_a_command_line(
    tmp_path: Path,
) -> None:
    password = SECRETS["REDIS_PASSWORD"]
    proc, port, here = _redis_as_compose_runs_it(tmp_path, password)
    try:
        with redis.Redis(port=port, password=password) as client:
            wait_until(lambda: _pings(client), timeout=10, what="redis as compose runs it")
            assert client.config_get("appendonly") == {"appendonly": "yes"}
        with redis.Redis(port=port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert password not in cmdline.read_text(errors="replace")
            except OSError:
                continue
        # Its healthcheck passes with the secret, and fails with another password.
        (check,) = resolved(service("redis")["healthcheck"]["test"])[1:]
        assert subprocess.run(["sh", "-c", here(check)], check=False).returncode == 0
        (tmp_path / "redis_password").write_text("not-the-password")
        assert subprocess.run(["sh", "-c", here(check)], check=False).returncode != 0
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_worker_scales_out_with_no_fixed_name_or_host_port() -> None:
    worker = service("worker")
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "hostname" not in worker
    path, options = split_command(command("worker"))
    assert path == ["worker"]
    assert "--concurrency" in options


def test_migration_runs_once_and_every_process_waits_for_it() -> None:
    migrate = service("migrate")
    assert command("migrate") == ["db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"] == {"condition": "service_healthy"}
    for name in PROCESSES:
        depends = service(name)["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends["postgres"] == {"condition": "service_healthy"}, name
        assert depends["redis"] == {"condition": "service_healthy"}, name


# --- healthchecks against the real thing ----------------------------------------------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[int]:
    """A real ``grassroots serve`` on a spare port (its /healthz needs no database)."""
    port = spare_port()
    with serving(tmp_path, "--port", str(port), ports=(port,)):
        yield port


def _run_healthcheck(code: str, port: int) -> subprocess.CompletedProcess[str]:
    code = code.replace("127.0.0.1:8000/", f"127.0.0.1:{port}/")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


def test_receiver_healthcheck_passes_on_a_live_receiver(receiver: int) -> None:
    result = _run_healthcheck(healthcheck_code("receiver"), receiver)
    assert result.returncode == 0, result.stderr


def test_receiver_healthcheck_fails_when_nothing_answers() -> None:
    result = _run_healthcheck(healthcheck_code("receiver"), spare_port())
    assert result.returncode == 1
    assert "Connection refused" in result.stderr
