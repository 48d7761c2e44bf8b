"""docker-compose.yml and the Dockerfile (SPEC §7), held to the real CLI, to the variables the
application reads (SPEC §5.7) and to the files ``pip install .`` needs.

Neither Docker nor compose is needed: the file is interpolated here by compose's rules and
validated against a model of the Compose specification's keys, every command is run through the
installed ``grassroots``, and the image's build stage is replayed by building a wheel from exactly
the files the Dockerfile copies. The SPEC read is the project's copy, ``tests/fixtures/SPEC.md``.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import click
import pytest
import redis
import yaml
from celery import Celery
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    StringConstraints,
    ValidationError,
    model_validator,
)

from tests.support.process_logs import register
from tests.support.stack import (
    BIN,
    FLOWER_BASIC_AUTH,
    OPS_TOKEN,
    SECRET,
    serving,
    spare_port,
    wait_until,
)
from worker.celery_app import build_config, check_safe
from worker.cli import main as cli
from worker.settings import ENVIRONMENT_VARIABLES, load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SPEC = ROOT / "tests" / "fixtures" / "SPEC.md"

# The long-running processes, and with the migration every service that runs our image.
PROCESSES = ("receiver", "worker", "beat", "flower")
OUR_SERVICES = ("migrate", *PROCESSES)
# What compose must refuse to start without; test values for the rest of this module.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-password",
    "REDIS_PASSWORD": "redis-password-for-tests",
    "WEBHOOK_SECRETS": SECRET,
    "OPS_TOKEN": OPS_TOKEN,
    "FLOWER_BASIC_AUTH": FLOWER_BASIC_AUTH,
}
# Inside a container, the receiver and Flower must listen on every interface to be reachable.
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104
# SPEC §5.7 variables the application does not read yet. The tests below fail once one is read, or
# reaches the containers, while still listed here: take it off then.


# --- reading the files -----------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def service(name: str) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services[name]


class MissingVariable(LookupError):
    pass


_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_]\w*))"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: ``$$``, ``$V``, ``${V}``, ``${V:-d}``, ``${V-d}``,
    ``${V:?e}``, ``${V?e}``."""

    def replace(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg = m["op"] or "", m["arg"] or ""
        # With a colon, an empty value counts as unset.
        unset = name not in env or (op.startswith(":") and env[name] == "")
        if op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op.endswith("-") and unset:
            return arg
        return env.get(name, "")

    return _REFERENCE.sub(replace, value)


def resolved(node: Any, env: Mapping[str, str] = SECRETS) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolved(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolved(value, env) for key, value in node.items()}
    return node


def environment(name: str) -> dict[str, str]:
    """A service's environment as its container gets it with only the secrets set."""
    env = service(name).get("environment", {})
    assert isinstance(env, dict), f"{name}: write environment as a mapping"
    return {key: str(value) for key, value in resolved(env).items()}


def command(name: str) -> list[str]:
    cmd = resolved(service(name)["command"])
    assert isinstance(cmd, list), f"{name}: write the command as a list (no shell in between)"
    return [str(word) for word in cmd]


def split_command(words: list[str]) -> tuple[list[str], list[str]]:
    """The subcommand path (the words before the first option) and the rest."""
    first_option = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
    return words[:first_option], words[first_option:]


def spec_variables() -> list[str]:
    """The variables SPEC §5.7 names, up to the next heading."""
    section = re.split(r"\n#+ ", SPEC.read_text().split("### 5.7", 1)[1], maxsplit=1)[0]
    return sorted(set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section)))


def healthcheck_code(name: str) -> str:
    """The Python one-liner of a ``CMD python -c CODE`` healthcheck."""
    test = resolved(service(name)["healthcheck"]["test"])
    assert test[:3] == ["CMD", "python", "-c"], f"{name}: {test}"
    return str(test[3])


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


# --- the Compose specification ---------------------------------------------------------------
#
# What `docker compose config` checks offline, without compose installed: the keys of the Compose
# specification (compose-spec.io) that this file uses, with their documented forms; an unknown key
# fails as a typo would. A key of the specification not modelled here fails too: add it, in its
# documented form, when the file starts using it.

Duration = Annotated[str, StringConstraints(pattern=r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")]
Name = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")]
Restart = Annotated[
    str, StringConstraints(pattern=r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
]
# [[HOST_IP:][PUBLISHED]:]TARGET[/PROTOCOL], ports or ranges of ports.
ShortPort = Annotated[
    str,
    StringConstraints(
        pattern=(
            r"^(?:(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:]+\]):(?:\d+(?:-\d+)?)?:|\d+(?:-\d+)?:)?"
            r"\d+(?:-\d+)?(?:/(?:tcp|udp|sctp))?$"
        )
    ),
]


def _require(condition: object, message: str) -> None:
    # A ValueError becomes a ValidationError naming where; an assert would vanish under -O.
    if not condition:
        raise ValueError(message)


VOLUME_MODES = {"ro", "rw", "z", "Z", "nocopy", "shared", "slave", "private", "rshared", "rslave"}


def _short_volume(entry: str) -> str:
    """``[SOURCE:]TARGET[:MODE]``: the target a path in the container, the modes known."""
    parts = entry.split(":")
    _require(1 <= len(parts) <= 3, f"{entry!r}: not [SOURCE:]TARGET[:MODE]")
    target = parts[0] if len(parts) == 1 else parts[1]
    _require(target.startswith("/"), f"{entry!r}: the target must be an absolute path")
    if len(parts) == 3:
        unknown = set(parts[2].split(",")) - VOLUME_MODES
        _require(not unknown, f"{entry!r}: unknown mode {sorted(unknown)}")
    return entry


ShortVolume = Annotated[str, AfterValidator(_short_volume)]


def named_volume(entry: str) -> str | None:
    """The named volume a short volume entry mounts; None for a host path or an anonymous one."""
    parts = entry.split(":")
    if len(parts) == 1 or parts[0].startswith(("/", ".", "~")):
        return None
    return parts[0]


class Spec(BaseModel):
    """An object of the specification: unknown keys are errors, except the ``x-`` extensions
    allowed on every object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _without_extensions(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not str(k).startswith("x-")}
        return data


class Healthcheck(Spec):
    test: str | list[str]
    interval: Duration | None = None
    timeout: Duration | None = None
    start_period: Duration | None = None
    start_interval: Duration | None = None
    retries: NonNegativeInt | None = None
    disable: bool | None = None

    @model_validator(mode="after")
    def _test_form(self) -> Healthcheck:
        # A string runs in the container's shell; a list starts with how to run the rest.
        if isinstance(self.test, list):
            form, *rest = self.test or [""]
            _require(form in ("NONE", "CMD", "CMD-SHELL"), f"test starts with {form!r}")
            _require(
                bool(rest) == (form != "NONE"), f"{form} takes {'no' if rest else 'a'} command"
            )
        else:
            _require(self.test.strip(), "an empty test")
        return self


class Dependency(Spec):
    condition: Literal["service_started", "service_healthy", "service_completed_successfully"] = (
        "service_started"
    )
    restart: bool | None = None
    required: bool | None = None


class Build(Spec):
    context: str
    dockerfile: str | None = None
    args: dict[str, str | None] | list[str] | None = None
    target: str | None = None


class Port(Spec):
    target: int
    published: str | int | None = None
    host_ip: str | None = None
    protocol: Literal["tcp", "udp", "sctp"] | None = None
    mode: Literal["host", "ingress"] | None = None
    name: str | None = None
    app_protocol: str | None = None


class Mount(Spec):
    type: Literal["volume", "bind", "tmpfs", "image", "npipe", "cluster"]
    source: str | None = None
    target: str
    read_only: bool | None = None


class Limits(Spec):
    cpus: str | float | None = None
    memory: str | None = None
    pids: int | None = None


class Resources(Spec):
    limits: Limits | None = None
    reservations: Limits | None = None


class RestartPolicy(Spec):
    condition: Literal["none", "on-failure", "any"] | None = None
    delay: Duration | None = None
    max_attempts: NonNegativeInt | None = None
    window: Duration | None = None


class Deploy(Spec):
    mode: Literal["replicated", "global"] | None = None
    replicas: NonNegativeInt | None = None
    resources: Resources | None = None
    restart_policy: RestartPolicy | None = None
    labels: dict[str, str] | list[str] | None = None


class ServiceNetwork(Spec):
    aliases: list[str] | None = None
    ipv4_address: str | None = None
    ipv6_address: str | None = None


class ServiceSecret(Spec):
    source: Name
    target: str | None = None
    uid: str | None = None
    gid: str | None = None
    mode: int | None = None


EnvironmentValue = str | int | float | bool | None


class Service(Spec):
    image: str | None = None
    build: str | Build | None = None
    command: str | list[str] | None = None
    entrypoint: str | list[str] | None = None
    environment: (
        dict[str, EnvironmentValue]
        | list[Annotated[str, StringConstraints(pattern=r"^[^=\s]+(=.*)?$")]]
        | None
    ) = None
    env_file: str | list[str] | None = None
    depends_on: list[Name] | dict[Name, Dependency] | None = None
    healthcheck: Healthcheck | None = None
    ports: list[int | ShortPort | Port] | None = None
    expose: list[str | int] | None = None
    volumes: list[ShortVolume | Mount] | None = None
    networks: list[Name] | dict[Name, ServiceNetwork | None] | None = None
    init: bool | None = None
    restart: Restart | None = None
    deploy: Deploy | None = None
    stop_grace_period: Duration | None = None
    stop_signal: str | None = None
    container_name: str | None = None
    hostname: str | None = None
    user: str | None = None
    working_dir: str | None = None
    labels: dict[str, str] | list[str] | None = None
    profiles: list[str] | None = None
    secrets: list[Name | ServiceSecret] | None = None

    @model_validator(mode="after")
    def _runs_something(self) -> Service:
        _require(self.image or self.build, "a service needs an image or a build")
        return self

    def dependencies(self) -> dict[str, Dependency]:
        if isinstance(self.depends_on, list):
            return {name: Dependency() for name in self.depends_on}
        return dict(self.depends_on or {})

    def secret_names(self) -> set[str]:
        return {s.source if isinstance(s, ServiceSecret) else s for s in self.secrets or []}

    def named_volumes(self) -> set[str]:
        names = set()
        for entry in self.volumes or []:
            name = entry.source if isinstance(entry, Mount) else named_volume(entry)
            if name and (not isinstance(entry, Mount) or entry.type == "volume"):
                names.add(name)
        return names


class TopLevel(Spec):
    """A top-level volume or network."""

    name: str | None = None
    driver: str | None = None
    driver_opts: dict[str, str] | None = None
    external: bool | None = None
    labels: dict[str, str] | list[str] | None = None


class Secret(Spec):
    """A top-level secret: from a file, from a variable of compose's environment, or external."""

    file: str | None = None
    environment: str | None = None
    external: bool | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        sources = [self.file, self.environment, self.external]
        _require(sum(x is not None for x in sources) == 1, "one of file, environment, external")
        return self


class ComposeFile(Spec):
    # ``version`` is obsolete (compose only warns): left out, so it fails here.
    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]*$")] | None = None
    services: dict[Name, Service] = Field(min_length=1)
    volumes: dict[Name, TopLevel | None] | None = None
    networks: dict[Name, TopLevel | None] | None = None
    secrets: dict[Name, Secret] | None = None

    @model_validator(mode="after")
    def _references_resolve(self) -> ComposeFile:
        volumes, networks = set(self.volumes or {}), set(self.networks or {}) | {"default"}
        for name, svc in self.services.items():
            for dependency, how in svc.dependencies().items():
                _require(
                    dependency in self.services, f"{name} depends on no service {dependency!r}"
                )
                _require(dependency != name, f"{name} depends on itself")
                # Compose accepts it, but `up` then fails: the dependency never becomes healthy.
                check = self.services[dependency].healthcheck
                _require(
                    how.condition != "service_healthy" or (check and not check.disable),
                    f"{name} waits for {dependency} to be healthy, which has no healthcheck",
                )
            undeclared = svc.named_volumes() - volumes
            _require(not undeclared, f"{name} mounts undeclared volumes {sorted(undeclared)}")
            unknown = set(svc.networks or ()) - networks
            _require(not unknown, f"{name} joins undeclared networks {sorted(unknown)}")
            secrets = svc.secret_names() - set(self.secrets or {})
            _require(not secrets, f"{name} uses undeclared secrets {sorted(secrets)}")
        return self


def test_compose_file_follows_the_compose_specification() -> None:
    ComposeFile.model_validate(resolved(compose()))


def test_extension_keys_are_allowed_at_the_top_and_in_a_service() -> None:
    document = resolved(compose())
    document["x-note"] = {"anything": ["goes"]}
    document["services"]["worker"]["x-note"] = "here too"
    ComposeFile.model_validate(document)


def _set(document: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


# Mistakes the model refuses, as `docker compose config` does (or `up`, for a healthy wait on a
# service that has no healthcheck; compose only warns of `version`): where each is, and what the
# model must say of it.
EXTRA = "Extra inputs are not permitted"
PATTERN = "String should match pattern"
MISTAKES: dict[str, tuple[tuple[str, ...], Any, tuple[str | int, ...], str]] = {
    "misspelt service key": (
        ("services", "receiver", "helthcheck"),
        {"test": ["CMD", "true"]},
        ("services", "receiver", "helthcheck"),
        EXTRA,
    ),
    "misspelt top-level key": (("volume",), {}, ("volume",), EXTRA),
    "obsolete version key": (("version",), "3.8", ("version",), EXTRA),
    "misspelt deploy key": (
        ("services", "worker", "deploy"),
        {"replica": 2},
        ("services", "worker", "deploy", "replica"),
        EXTRA,
    ),
    "unknown dependency condition": (
        ("services", "worker", "depends_on", "migrate", "condition"),
        "service_complete",
        ("services", "worker", "depends_on", "migrate", "condition"),
        "Input should be 'service_started', 'service_healthy' or 'service_completed_successfully'",
    ),
    "dependency on no service": (
        ("services", "beat", "depends_on", "migrtae"),
        {"condition": "service_completed_successfully"},
        (),
        "beat depends on no service 'migrtae'",
    ),
    "healthy wait on a service without a healthcheck": (
        ("services", "receiver", "depends_on", "beat"),
        {"condition": "service_healthy"},
        (),
        "receiver waits for beat to be healthy, which has no healthcheck",
    ),
    "unknown healthcheck form": (
        ("services", "redis", "healthcheck", "test"),
        ["CMD-SHEL", "redis-cli ping"],
        ("services", "redis", "healthcheck"),
        "test starts with 'CMD-SHEL'",
    ),
    "healthcheck with nothing to run": (
        ("services", "redis", "healthcheck", "test"),
        ["CMD"],
        ("services", "redis", "healthcheck"),
        "CMD takes a command",
    ),
    "duration without a unit": (
        ("services", "redis", "healthcheck", "interval"),
        "5 seconds",
        ("services", "redis", "healthcheck", "interval"),
        PATTERN,
    ),
    "unknown restart policy": (
        ("services", "migrate", "restart"),
        "never",
        ("services", "migrate", "restart"),
        PATTERN,
    ),
    "port that is not a number": (
        ("services", "receiver", "ports"),
        ["8000:eighty"],
        ("services", "receiver", "ports", 0),
        PATTERN,
    ),
    "relative volume target": (
        ("services", "redis", "volumes"),
        ["redis-data:data"],
        ("services", "redis", "volumes", 0),
        "'redis-data:data': the target must be an absolute path",
    ),
    "undeclared named volume": (
        ("services", "redis", "volumes"),
        ["redis-dta:/data"],
        (),
        "redis mounts undeclared volumes ['redis-dta']",
    ),
    "undeclared secret": (
        ("services", "prometheus", "secrets"),
        ["ops_tokn"],
        (),
        "prometheus uses undeclared secrets ['ops_tokn']",
    ),
    "secret with two sources": (
        ("secrets", "ops_token", "file"),
        "./ops_token",
        ("secrets", "ops_token"),
        "one of file, environment, external",
    ),
    "environment value that is not a scalar": (
        ("services", "worker", "environment", "RETENTION_DAYS"),
        {"days": 30},
        ("services", "worker", "environment", "RETENTION_DAYS"),
        "Input should be a valid string",
    ),
}


def _within(expected: tuple[str | int, ...], loc: tuple[str | int, ...]) -> bool:
    """``expected`` in ``loc`` in order, skipping the names pydantic gives the members of a
    union (``dict[str,Dependency]``)."""
    rest = iter(loc)
    return all(any(part == key for part in rest) for key in expected)


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_compose_model_refuses_each_mistake(mistake: str) -> None:
    path, value, where, message = MISTAKES[mistake]
    document = _set(resolved(compose()), path, value)
    with pytest.raises(ValidationError) as refused:
        ComposeFile.model_validate(document)
    found = [(e["loc"], e["msg"]) for e in refused.value.errors()]
    assert any(_within(where, loc) and message in msg for loc, msg in found), found


# --- the monitoring profile (SPEC §5.10) -----------------------------------------------------

MONITORING = ("prometheus", "grafana")


def bind_mounts(name: str) -> dict[str, Path]:
    """A service's bind mounts of this repository's files: their target in the container, and
    the file or directory mounted."""
    mounts = {}
    for entry in resolved(service(name)["volumes"]):
        source, target = entry.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def prometheus_option(option: str) -> str:
    words = command("prometheus")
    return next(w.split("=", 1)[1] for w in words if w.startswith(f"--{option}="))


def mounted(name: str, target: str) -> Path:
    """The repository file a service sees at ``target`` (itself or within a mounted directory)."""
    for at, source in bind_mounts(name).items():
        if target == at:
            return source
        if target.startswith(at.rstrip("/") + "/"):
            return source / posixpath.relpath(target, at)
    raise AssertionError(f"{name} mounts nothing at {target}")


def test_prometheus_and_grafana_run_only_under_the_monitoring_profile() -> None:
    for name, svc in compose()["services"].items():
        assert svc.get("profiles") == (["monitoring"] if name in MONITORING else None), name


def test_the_monitoring_services_mount_files_that_exist_and_publish_on_loopback_only() -> None:
    for name in MONITORING:
        assert bind_mounts(name), name
        for target, source in bind_mounts(name).items():
            assert source.exists(), f"{name} mounts {source} at {target}: no such file"
            assert target.startswith("/etc/"), f"{name}: {target}: mount configuration read-only"
        for entry in resolved(service(name)["volumes"]):
            if entry.startswith("./"):
                assert entry.endswith(":ro"), f"{name}: {entry} should be read-only"
        for port in resolved(service(name)["ports"]):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_prometheus_loads_the_alert_rules_and_scrapes_the_receivers_metrics() -> None:
    config = yaml.safe_load(mounted("prometheus", prometheus_option("config.file")).read_text())
    rule_files = [mounted("prometheus", path) for path in config["rule_files"]]
    assert rule_files == [ROOT / "deploy" / "prometheus" / "alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    ((target,),) = [static["targets"] for static in job["static_configs"]]
    host, port = target.rsplit(":", 1)
    # The target is a listener of ours that serves /metrics: the ops listener where `serve` has
    # one (--ops-port), else its one listener, if that serves the ops routes.
    path, options = split_command(command(host))
    assert path == ["serve"], f"{target} is not a grassroots listener"
    served = dict(zip(options[::2], options[1::2], strict=False))
    if "--ops-port" in served:
        assert served["--ops-port"] == port, f"/metrics is on {served['--ops-port']}, not {port}"
        # Prometheus runs in its own container: a listener on loopback is out of its reach.
        assert served.get("--ops-host") == EVERY_INTERFACE, "the ops listener is on loopback"
    else:
        assert served["--port"] == port
        assert served.get("--routes", "all") in ("all", "ops")
    assert host in service("prometheus")["depends_on"]


def test_prometheus_scrapes_with_the_ops_token_from_a_secret_never_in_a_file() -> None:
    config_file = mounted("prometheus", prometheus_option("config.file"))
    (job,) = yaml.safe_load(config_file.read_text())["scrape_configs"]
    authorization = job["authorization"]
    assert set(authorization) == {"type", "credentials_file"}
    assert authorization["type"] == "Bearer"
    secret = posixpath.relpath(authorization["credentials_file"], "/run/secrets")
    assert secret in service("prometheus")["secrets"]
    assert compose()["secrets"][secret] == {"environment": "OPS_TOKEN"}
    assert OPS_TOKEN not in config_file.read_text()


def test_grafana_gets_the_dashboard_and_prometheus_provisioned() -> None:
    provisioning = mounted("grafana", "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = urlsplit(source["url"])
    assert (source["type"], url.hostname) == ("prometheus", "prometheus")
    assert "--web.listen-address" not in " ".join(command("prometheus"))  # its default, 9090
    assert url.port == 9090
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "grassroots.yml").read_text())[
        "providers"
    ]
    folder = provider["options"]["path"]
    dashboard = mounted("grafana", f"{folder}/grassroots.json")
    assert dashboard == ROOT / "deploy" / "grafana" / "grassroots.json"
    assert json.loads(dashboard.read_text())["uid"] == "grassroots"
    password = service("grafana")["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    secret = posixpath.relpath(password, "/run/secrets")
    assert secret in service("grafana")["secrets"]
    assert "environment" in compose()["secrets"][secret]
    assert service("grafana")["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


# --- the image -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile() -> list[Instruction]:
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for entry in logical:
        keyword, _, arguments = entry.strip().partition(" ")
        out.append(Instruction(keyword.upper(), arguments.strip()))
    return out


def stages() -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in dockerfile():
        if instruction.keyword == "FROM":
            result.append([])
        result[-1].append(instruction)
    return result


def test_image_is_python_311_slim_running_grassroots_as_a_non_root_user() -> None:
    instructions = dockerfile()
    bases = [i.arguments.split()[0] for i in instructions if i.keyword == "FROM"]
    assert bases and all(base == "python:3.11-slim" for base in bases), bases
    final = stages()[-1]
    users = [i.arguments for i in final if i.keyword == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    entrypoints = [i.arguments for i in final if i.keyword == "ENTRYPOINT"]
    assert json.loads(entrypoints[-1]) == ["grassroots"]


def test_image_installs_its_dependencies_from_the_runtime_lock_before_the_project() -> None:
    build = next(s for s in stages() if any("pip install ." in i.arguments for i in s))
    runs = [i.arguments for i in build if i.keyword == "RUN"]
    copies = [i.arguments.split() for i in build if i.keyword == "COPY"]
    locked = next(n for n, run in enumerate(runs) if "-r requirements/runtime.txt" in run)
    assert "--require-hashes" in runs[locked]
    # The project goes in on top, without resolving anything again.
    project = next(n for n, run in enumerate(runs) if "pip install ." in run)
    assert locked < project and "--no-deps" in runs[project]
    assert ["requirements/runtime.txt", "requirements/runtime.txt"] in copies
    assert in_build_context("requirements/runtime.txt")


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """``.dockerignore`` as (re-include, pattern) pairs, in order: the last match wins."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", pattern):
            if token == "**/":
                regex += "(?:.*/)?"
            elif token == "**":
                regex += ".*"
            elif token == "*":
                regex += "[^/]*"
            elif token == "?":
                regex += "[^/]"
            elif token.startswith("["):
                regex += token
            else:
                regex += re.escape(token)
        rules.append((include, re.compile(regex)))
    return rules


def in_build_context(relative: str) -> bool:
    """Docker's rule: a pattern that matches a path or any of its parent directories counts."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for include, regex in _ignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = include
    return included


def test_build_context_leaves_out_local_state_secrets_and_caches() -> None:
    for path in (
        ".venv/bin/python",
        "var/grassroots.db",
        "var/ops-token",
        ".env",
        ".git/config",
        "tests/conftest.py",
        "worker/__pycache__/api.cpython-311.pyc",
        "requirements/dev.txt",
    ):
        assert not in_build_context(path), path
    for path in (
        "pyproject.toml",
        "README.md",
        "requirements/runtime.txt",
        "worker/cli/__init__.py",
        "models/migrations/env.py",
    ):
        assert in_build_context(path), path


def _copy_into(source: str, destination: Path) -> None:
    """One ``COPY source dest`` of the build, from the build context: a directory's contents, or
    a file."""
    source = posixpath.normpath(source)
    assert in_build_context(source), f"COPY {source}: .dockerignore leaves it out of the context"
    origin = ROOT / source
    if origin.is_file():
        target = destination / origin.name if destination.is_dir() else destination
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, target)
        return
    assert origin.is_dir(), f"COPY {source}: no such file or directory"
    for path in sorted(origin.rglob("*")):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_file() and in_build_context(relative):
            target = destination / path.relative_to(origin)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def replay_build_stage(into: Path) -> Path:
    """Lay out the build stage's WORKDIR as its COPY instructions would; return it."""
    build = next(s for s in stages() if any("pip install ." in i.arguments for i in s))
    workdir = "/"
    for instruction in build:
        if instruction.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, instruction.arguments)
            (into / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword in ("COPY", "ADD"):
            assert instruction.keyword == "COPY", "ADD fetches and unpacks: use COPY"
            words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
            *sources, dest = words
            target = into / posixpath.join(workdir, dest).lstrip("/")
            if dest.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
            for source in sources:
                _copy_into(source, target)
    return into / workdir.lstrip("/")


@pytest.mark.slow
def test_image_installs_from_exactly_the_files_it_copies(tmp_path: Path) -> None:
    source = replay_build_stage(tmp_path / "image")
    wheels = tmp_path / "wheels"
    # The same isolated PEP 517 build `pip install .` does in the image (not the editable install
    # the tests run on, which would find the work tree's files whether they were copied or not).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("grassroots-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "grassroots = worker.cli:main" in archive.read(entry_points).decode()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    readme = (ROOT / "README.md").read_text().strip().splitlines()
    assert readme[-1] in metadata.decode(), "the image was built without README.md"
    for package in ("worker", "tasks", "models"):
        for module in (ROOT / package).rglob("*.py"):
            assert str(module.relative_to(ROOT)) in names, f"the image lacks {module}"
    migrations = ROOT / "models" / "migrations"
    for path in [
        *migrations.glob("*.py"),
        *migrations.glob("*.mako"),
        *migrations.glob("versions/*.py"),
    ]:
        assert str(path.relative_to(ROOT)) in names, f"`grassroots db upgrade` would lack {path}"
