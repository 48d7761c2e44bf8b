"""``grassroots run``: the whole local stack in one command, on embedded defaults.

Its state is kept under the home (GRASSROOTS_HOME or ``--home``, default ./var): the SQLite
database, the generated webhook secret, ops token and Flower's basic auth, beat's schedule, a
private redis's files and password. Secrets reach the children through their environment (the
private redis's password through its stdin), never their command lines (which ``ps`` shows to
every user of the machine).
Ports are checked first: a port taken (by another stack, most likely) refuses the run before
anything starts. Then migrations, and the receiver, a worker, beat and Flower as child processes,
their output prefixed by name. If no Redis answers at BROKER_URL and ``redis-server`` is
installed, a private one is started under the home, requiring a password, and stopped with the
rest: BROKER_URL's password, else one generated once in the home; BROKER_URL with it is kept in
the home too (``broker-url``), where commands run from here find it. Ctrl-C stops every
child; a child that dies is reported and takes the stack down with it, rather than being silently
lost.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import click

from worker.listeners import FLOWER, OPS, RECEIVER, base_url, record
from worker.settings import DEFAULT_BROKER_URL, HOME_SECRETS, get_settings, home_secrets
from worker.signing import generate_secret


def _ops_token() -> str:
    return secrets.token_urlsafe(32)


def _flower_basic_auth() -> str:
    return f"{FLOWER_USER}:{secrets.token_urlsafe(24)}"


FLOWER_USER = "grassroots"
MAKE_SECRET: dict[str, Callable[[], str]] = {
    "WEBHOOK_SECRETS": generate_secret,
    "OPS_TOKEN": _ops_token,
    "FLOWER_BASIC_AUTH": _flower_basic_auth,
}


# The private redis's password, generated once when BROKER_URL names none.
REDIS_PASSWORD_FILE = "redis-password"  # noqa: S105 (a file name)


def redis_server_argv(
    port: int,
    directory: Path,
    *,
    persistent: bool,
    executable: str = "redis-server",
    config_on_stdin: bool = False,
) -> list[str]:
    """A redis-server listening on loopback only. Persistent for ``grassroots run`` (an
    append-only file, and refusing writes rather than evicting queued tasks when full); otherwise
    it keeps nothing on disk (tests and benchmarks). With ``config_on_stdin`` it reads its
    configuration from stdin first (``redis_config``: the password, which on its command line
    ``ps`` would show every user)."""
    keep = (
        ["--appendonly", "yes", "--maxmemory-policy", "noeviction"]
        if persistent
        else ["--save", "", "--appendonly", "no"]
    )
    config = ["-"] if config_on_stdin else []
    return [
        executable,
        *config,
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
        *keep,
    ]


def redis_config(password: str) -> str:
    """The configuration that makes a redis-server require ``password`` (a quoted string)."""
    quoted = password.replace("\\", "\\\\").replace('"', '\\"')
    return f'requirepass "{quoted}"\n'


def with_password(url: str, password: str) -> str:
    """``url`` (a redis:// URL) with ``password`` in it."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f":{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            # A Redis that requires a password answers too.
            return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _port_problem(host: str, port: int) -> str | None:
    """Why nothing could listen on ``host:port`` (None: it is free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As uvicorn and Flower (Tornado) bind: a port a stopped stack left in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    return None


def _refuse(message: str) -> int:
    click.echo(f"grassroots: {message}", err=True)
    return 1


def _ports_refusal(host: str, port: int, ops_port: int, flower_port: int) -> str | None:
    """The first port the stack needs that it cannot have, as a one-line refusal."""
    for what, option, address, number in (
        ("the receiver", "--port", host, port),
        ("the ops API and console", "--ops-port", "127.0.0.1", ops_port),
        ("Flower", "--flower-port", "127.0.0.1", flower_port),
    ):
        problem = _port_problem(address, number)
        if problem == "in use":
            return (
                f"port {number} ({what}) is already in use on {address}: another `grassroots run`"
                f" may be running; stop it, or pick another port with {option}"
            )
        if problem is not None:
            return (
                f"port {number} ({what}) cannot be used on {address} ({problem}):"
                f" pick another with {option}"
            )
    return None


def _new_secret(path: Path, value: str) -> None:
    """Write a secret file, mode 600 from its creation: never readable by others, even briefly."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another `grassroots run` on this home made it just now: that one is used
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")


def _replace_secret(path: Path, value: str) -> None:
    """Write a secret file whole, mode 600 from its creation, in place of the one there."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.unlink(missing_ok=True)
    _new_secret(partial, value)
    partial.replace(path)


def _stack_secrets(home: Path, env: dict[str, str]) -> str | None:
    """Fill ``env`` with the stack's secrets, generating under the home those that neither the
    environment nor the home has, and say where each comes from (never its value). A refusal
    message if one cannot be had."""
    kept = home_secrets(home, {})
    for name in MAKE_SECRET:
        file = HOME_SECRETS[name]
        what, path = file.replace("-", " "), home / file
        if env.get(name) and env[name] != kept.get(name):
            click.echo(f"run | {what}: from {name}")
        elif name in kept:
            click.echo(f"run | {what}: {path}")
        elif path.exists():
            return f"{path} is empty: remove it, and a new {what} is generated"
        else:
            _new_secret(path, MAKE_SECRET[name]())
            click.echo(f"run | generated the {what}: {path} (mode 600)")
    env.update(home_secrets(home, env))
    return None


class Child:
    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], *, stdin: str | None = None
    ) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=None if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
        self.thread = threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True)
        self.thread.start()

    def _pump(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            sys.stdout.write(f"{self.name:<7}| {line}")
            sys.stdout.flush()

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _where_the_cli_finds_it(home: Path) -> str:
    where = (
        f"grassroots commands started in {Path.cwd()} find this stack by themselves"
        f" (from elsewhere: --home {home})"
        if not get_settings().home.is_absolute()
        else f"grassroots commands find this stack with --home {home} or GRASSROOTS_HOME={home}"
    )
    if os.environ.get("DATABASE_URL"):
        where += "; its database is DATABASE_URL's: they need it set too"
    return where


def free_ops_port(port: int, flower_port: int) -> int:
    """The ops listener's port when none is asked for: the receiver's + 1, else (taken, most
    likely by another stack on the defaults) any free one on loopback; it is recorded in the
    home with the others."""
    candidate = port + 1
    if (
        candidate <= 65535
        and candidate != flower_port
        and _port_problem("127.0.0.1", candidate) is None
    ):
        return candidate
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_stack(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    ops_port: int | None = None,
    flower_port: int = 5555,
) -> int:
    # Everything that can refuse the run does so before anything is made or started.
    if ops_port is None:
        ops_port = free_ops_port(port, flower_port)
    refusal = _ports_refusal(host, port, ops_port, flower_port)
    if refusal is not None:
        return _refuse(refusal)
    env = dict(os.environ)
    broker = urlsplit(env.get("BROKER_URL") or DEFAULT_BROKER_URL)
    broker_port = broker.port or 6379
    redis_server = None
    if not _answers(broker.hostname or "127.0.0.1", broker_port):
        redis_server = shutil.which("redis-server")
        if redis_server is None or broker.hostname not in ("127.0.0.1", "localhost"):
            return _refuse(f"no Redis answers at {broker.geturl()} and none can be started here")
        if _port_problem("127.0.0.1", broker_port) is not None:
            return _refuse(
                f"port {broker_port} (BROKER_URL) is taken by something that does not answer as"
                " Redis, so no private redis-server can start there: stop it, or set BROKER_URL"
                " to another port"
            )

    home = get_settings().home.absolute()
    # It holds the secrets and the roster's personal data: for its owner only.
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env["GRASSROOTS_HOME"] = str(home)
    refusal = _stack_secrets(home, env)
    if refusal is not None:
        return _refuse(refusal)
    click.echo(f"run | {_where_the_cli_finds_it(home)}")
    children: list[Child] = []
    if redis_server is not None:
        redis = _start_redis(redis_server, broker_port, home, env, _private_password(home, env))
        if redis is None:
            return 1
        children.append(redis)
    upgrade = subprocess.run([*CLI, "db", "upgrade"], env=env, check=False)
    if upgrade.returncode != 0:
        for child in children:
            child.stop()
        return upgrade.returncode
    serve = ["serve", "--host", host, "--port", str(port), "--ops-port", str(ops_port)]
    children += [
        Child("serve", [*CLI, *serve], env),
        Child("worker", [*CLI, "worker"], env),
        Child("beat", [*CLI, "beat"], env),
        Child("flower", [*CLI, "flower", "--port", str(flower_port)], env),
    ]
    # Recorded in the home: `demo` and `send-webhook` run from here post where this stack listens.
    listening = {
        RECEIVER: base_url(host, port),
        OPS: base_url("127.0.0.1", ops_port),
        FLOWER: base_url("127.0.0.1", flower_port),
    }
    where = record(home, listening)
    click.echo(
        f"run | receiver {listening[RECEIVER]}  ops API and console {listening[OPS]}"
        f"  Flower {listening[FLOWER]}  (recorded in {where}; Ctrl-C stops everything)"
    )
    return _supervise(children)


# Our own command line, in this interpreter.
CLI = [sys.executable, "-m", "worker.cli"]


def _private_password(home: Path, env: dict[str, str]) -> str:
    """The password the private redis requires: BROKER_URL's, else the home's (generated once).
    ``env``'s BROKER_URL gets it, and the home keeps that URL for the commands run from here."""
    url = env.get("BROKER_URL") or DEFAULT_BROKER_URL
    password = unquote(urlsplit(url).password or "")
    if not password:
        path = home / REDIS_PASSWORD_FILE
        if not path.exists():
            _new_secret(path, secrets.token_urlsafe(32))
            click.echo(f"run | generated the redis password: {path} (mode 600)")
        password = path.read_text().strip()
        url = with_password(url, password)
        if os.environ.get("BROKER_URL"):
            click.echo(
                "run | BROKER_URL names no password: commands run from here find the one the"
                f" private redis requires in {home / HOME_SECRETS['BROKER_URL']} once BROKER_URL"
                " is unset"
            )
    env["BROKER_URL"] = url
    _replace_secret(home / HOME_SECRETS["BROKER_URL"], url)
    return password


def _start_redis(
    executable: str, port: int, home: Path, env: dict[str, str], password: str
) -> Child | None:
    click.echo(f"run | starting a private redis-server on port {port}, requiring a password")
    argv = redis_server_argv(
        port, home, persistent=True, executable=executable, config_on_stdin=True
    )
    child = Child("redis", argv, env, stdin=redis_config(password))
    deadline = time.monotonic() + 10
    while not _answers("127.0.0.1", port):
        if time.monotonic() > deadline or child.proc.poll() is not None:
            click.echo("run | redis-server did not start", err=True)
            child.stop()
            return None
        time.sleep(0.1)
    return child


def _supervise(children: list[Child]) -> int:
    """Until Ctrl-C (or SIGTERM), or a child dies, which is reported and stops the stack."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    status = 0
    while not stopping.is_set():
        for child in children:
            code = child.proc.poll()
            if code is not None:
                click.echo(
                    f"run | {child.name} exited with status {code}: stopping the stack", err=True
                )
                status = 1
                stopping.set()
                break
        stopping.wait(0.5)
    # Stop in reverse: consumers and producers first, the broker last.
    for child in reversed(children):
        child.stop()
    click.echo("run | stopped")
    return status
