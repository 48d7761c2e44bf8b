"""docker-compose.yml and the Dockerfile (SPEC §7), held to the real CLI, to the variables the
application reads (SPEC §5.7) and to the files ``pip install .`` needs.

No Docker engine is needed: the file is parsed here and checked by the compose CLI's own offline
validation (``config``), every command is run through the installed ``grassroots``, and the image's
build stage is replayed by building a wheel from exactly the files the Dockerfile copies.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
import pytest
import yaml
from celery import Celery

from tests.conftest import SHARED
from tests.stack import BIN, spare_port, wait_until
from worker.celery_app import build_config, check_safe
from worker.cli import main as cli
from worker.settings import ENVIRONMENT_VARIABLES, load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The long-running processes, and with the migration every service that runs our image.
PROCESSES = ("receiver", "worker", "beat", "flower")
OUR_SERVICES = ("migrate", *PROCESSES)
# What compose must refuse to start without; test values for the rest of this module.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-password",
    "WEBHOOK_SECRETS": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "OPS_TOKEN": "ops-token",
    "FLOWER_BASIC_AUTH": "user:pass",
}
# Inside a container, the receiver and Flower must listen on every interface to be reachable.
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104


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
    spec = (SHARED / "SPEC.md").read_text()
    section = spec.split("### 5.7", 1)[1].split("\n## ", 1)[0]
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


def test_receiver_serves_http_on_every_interface_of_its_container() -> None:
    path, options = split_command(command("receiver"))
    assert path == ["serve"]
    assert options == ["--host", EVERY_INTERFACE, "--port", "8000"]


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
    variables = spec_variables()
    assert len(variables) == 12, variables
    assert set(variables) <= set(ENVIRONMENT_VARIABLES)


@pytest.mark.parametrize("name", PROCESSES)
def test_every_spec_variable_reaches_every_process(name: str) -> None:
    missing = set(spec_variables()) - set(environment(name))
    assert not missing, f"{name} does not get {sorted(missing)}"


def test_each_variable_is_overridable_by_its_own_name_and_secrets_have_no_default() -> None:
    for key, value in service("receiver")["environment"].items():
        if key == "DATABASE_URL":
            continue  # made from POSTGRES_PASSWORD, the one secret it shares with postgres
        operator = ":?" if key in SECRETS else ":-"
        assert value.startswith(f"${{{key}{operator}") and value.endswith("}"), f"{key}: {value}"
    url = service("receiver")["environment"]["DATABASE_URL"]
    assert "${POSTGRES_PASSWORD:?" in url
    assert service("postgres")["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(secret: str) -> None:
    without = {k: v for k, v in SECRETS.items() if k != secret}
    with pytest.raises(MissingVariable, match=secret):
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
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.clever_api_base == "https://api.clever.com"
    assert settings.clever_district_tokens == ()
    assert settings.retention_days == 30
    assert settings.removal_brake_percent == 10
    assert settings.lock_timeout_ms == 5000
    assert settings.task_max_retries == 8
    assert settings.retry_backoff_max == 600
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
    assert words[0] == "redis-server"
    options = dict(zip(words[1::2], words[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert any(volume.endswith(":/data") for volume in service("redis")["volumes"])
    assert any(
        volume.endswith(":/var/lib/postgresql/data") for volume in service("postgres")["volumes"]
    )


def test_postgres_redis_receiver_and_flower_have_healthchecks() -> None:
    postgres = resolved(service("postgres")["healthcheck"]["test"])
    assert postgres[:2] == ["CMD", "pg_isready"]
    assert resolved(service("redis")["healthcheck"]["test"]) == ["CMD", "redis-cli", "ping"]
    for name, path in (("receiver", "/healthz"), ("flower", "/healthcheck")):
        port = command(name)[command(name).index("--port") + 1]
        assert f"http://127.0.0.1:{port}{path}'" in healthcheck_code(name)


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN), "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: _answers(port) or proc.poll() is not None, timeout=30, what="serve")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


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


# --- the compose CLI's own validation --------------------------------------------------------


def compose_cli() -> list[str]:
    """``docker compose`` (v2 plugin) where it is installed, else ``docker-compose``: both check
    the file against the Compose schema and interpolate it offline, with no engine."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    assert legacy is not None, (
        "neither `docker compose` nor `docker-compose` is installed "
        "(apt-get install --no-install-recommends docker-compose)"
    )
    return [legacy]


def run_compose(
    tmp_path: Path, env: Mapping[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    # An empty env file and a bare environment: a developer's .env or COMPOSE_* cannot leak in.
    env_file = tmp_path / "empty.env"
    env_file.touch()
    return subprocess.run(
        [*compose_cli(), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_cli_accepts_the_file(tmp_path: Path) -> None:
    result = run_compose(tmp_path, SECRETS, "config", "--quiet")
    assert result.returncode == 0, result.stderr + result.stdout


def test_compose_cli_refuses_the_file_without_a_secret(tmp_path: Path) -> None:
    without = {k: v for k, v in SECRETS.items() if k != "OPS_TOKEN"}
    result = run_compose(tmp_path, without, "config", "--quiet")
    assert result.returncode != 0
    assert "set OPS_TOKEN" in result.stderr


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
        "worker/__pycache__/cli.cpython-311.pyc",
    ):
        assert not in_build_context(path), path
    for path in ("pyproject.toml", "README.md", "worker/cli.py", "models/migrations/env.py"):
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
