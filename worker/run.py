"""``grassroots run``: the whole local stack in one command, on embedded defaults.

Migrations first, then the receiver, a worker, beat and Flower as child processes, their output
prefixed by name. If no Redis answers at BROKER_URL and ``redis-server`` is installed, a private
one is started under ./var and stopped with the rest. Ctrl-C stops every child; a child that dies
is reported and takes the stack down with it, rather than being silently lost.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import click

from worker.signing import generate_secret

VAR = Path("var")


def redis_server_argv(
    port: int, directory: Path, *, persistent: bool, executable: str = "redis-server"
) -> list[str]:
    """A redis-server listening on loopback only. Persistent for ``grassroots run`` (an
    append-only file, and refusing writes rather than evicting queued tasks when full); otherwise
    it keeps nothing on disk (tests and benchmarks)."""
    keep = (
        ["--appendonly", "yes", "--maxmemory-policy", "noeviction"]
        if persistent
        else ["--save", "", "--appendonly", "no"]
    )
    return [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), *keep]


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _local_secret(name: str, make: str) -> str:
    """A secret kept under ./var (mode 600), made on first start."""
    path = VAR / name
    if path.exists():
        return path.read_text().strip()
    VAR.mkdir(exist_ok=True)
    path.write_text(make + "\n")
    path.chmod(0o600)
    click.echo(f"run | generated {name.replace('-', ' ')} in {path}: {make}")
    return make


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
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


def run_stack(*, host: str = "127.0.0.1", port: int = 8000, flower_port: int = 5555) -> int:
    env = dict(os.environ)
    env.setdefault("WEBHOOK_SECRETS", _local_secret("webhook-secret", generate_secret()))
    env.setdefault("OPS_TOKEN", _local_secret("ops-token", secrets.token_urlsafe(32)))
    exe = [sys.executable, "-m", "worker.cli"]
    children: list[Child] = []

    broker = urlsplit(env.get("BROKER_URL") or "redis://127.0.0.1:6379/0")
    if not _answers(broker.hostname or "127.0.0.1", broker.port or 6379):
        redis_server = shutil.which("redis-server")
        if redis_server is None or broker.hostname not in ("127.0.0.1", "localhost"):
            click.echo(
                f"run | no Redis answers at {broker.geturl()} and none can be started here",
                err=True,
            )
            return 1
        VAR.mkdir(exist_ok=True)
        click.echo(f"run | starting a private redis-server on port {broker.port or 6379}")
        children.append(
            Child(
                "redis",
                redis_server_argv(
                    broker.port or 6379, VAR.resolve(), persistent=True, executable=redis_server
                ),
                env,
            )
        )
        deadline = time.monotonic() + 10
        while not _answers("127.0.0.1", broker.port or 6379):
            if time.monotonic() > deadline or children[0].proc.poll() is not None:
                click.echo("run | redis-server did not start", err=True)
                children[0].stop()
                return 1
            time.sleep(0.1)

    upgrade = subprocess.run([*exe, "db", "upgrade"], env=env, check=False)
    if upgrade.returncode != 0:
        for child in children:
            child.stop()
        return upgrade.returncode

    children += [
        Child("serve", [*exe, "serve", "--host", host, "--port", str(port)], env),
        Child("worker", [*exe, "worker"], env),
        Child("beat", [*exe, "beat"], env),
        Child("flower", [*exe, "flower", "--port", str(flower_port)], env),
    ]
    click.echo(
        f"run | receiver http://{host}:{port}  Flower http://127.0.0.1:{flower_port}"
        "  (Ctrl-C stops everything)"
    )
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
