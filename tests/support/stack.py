"""A real grassroots stack for end-to-end tests: a private redis-server on a spare port, and
``grassroots serve`` / ``worker`` / ``beat`` processes against a fresh Postgres database.

Everything goes through the SPEC's interfaces: signed HTTP posts, the CLI, the ops API.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.support.process_logs import register
from worker.run import redis_config, redis_server_argv, with_password
from worker.signing import signed_headers

T = TypeVar("T")
# Test values as strong as the settings require (WEBHOOK_SECRETS: a 24-byte key at least;
# OPS_TOKEN: 24 characters; FLOWER_BASIC_AUTH: a 16-character password): every test uses these.
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OPS_TOKEN = "test-ops-token-0123456789"
FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-password-for-tests"
FLOWER_BASIC_AUTH = f"{FLOWER_USER}:{FLOWER_PASSWORD}"
BIN = Path(sys.executable).parent / "grassroots"


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], T], *, timeout: float = 60, what: str = "condition") -> T:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def terminate_group(proc: subprocess.Popen[Any], *, within: float) -> bool:
    """SIGTERM to the process group ``proc`` leads; True if it ended within ``within`` seconds,
    else it is killed (SIGKILL) and False."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return False
    return True


class RedisServer:
    """A private redis-server on a spare port; with ``password``, it requires it (given on its
    stdin, as `grassroots run` gives it)."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        persistent: bool = False,
        password: str | None = None,
    ) -> None:
        self.directory = directory
        self.port = port or spare_port()
        # As `grassroots run` and compose keep it: an append-only file, so a restart keeps data.
        self.persistent = persistent
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        url = f"redis://127.0.0.1:{self.port}/0"
        return url if self.password is None else with_password(url, self.password)

    def start(self) -> None:
        log = self.directory / f"redis-{self.port}.log"
        argv = redis_server_argv(
            self.port,
            self.directory,
            persistent=self.persistent,
            config_on_stdin=self.password is not None,
        )
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=None if self.password is None else subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if self.password is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(redis_config(self.password).encode())
            self.proc.stdin.close()
        register(f"redis-server :{self.port}", log, self.proc)
        wait_until(self.ping, timeout=10, what=f"redis on {self.port}")

    def ping(self) -> bool:
        auth = b"" if self.password is None else f"AUTH {self.password}\r\n".encode()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(auth + b"PING\r\n")
                return s.recv(16).endswith(b"+PONG\r\n")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL: gone at once, every connection cut, nothing saved on the way out."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Stack:
    def __init__(
        self, tmp_path: Path, database_url: str, *, persistent_redis: bool = False, **env: str
    ) -> None:
        self.tmp = tmp_path
        self.database_url = database_url
        self.redis = RedisServer(tmp_path, persistent=persistent_redis)
        self.port = spare_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
            "DATABASE_URL": database_url,
            "BROKER_URL": self.redis.url,
            "WEBHOOK_SECRETS": SECRET,
            "OPS_TOKEN": OPS_TOKEN,
            "REMOVAL_BRAKE_PERCENT": "100",
            "RELAY_INTERVAL": "1",
            "RELAY_AFTER_SECONDS": "2",
            "RETRY_BACKOFF_MAX": "2",
            "LOCK_TIMEOUT_MS": "500",
            **env,
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # processes ------------------------------------------------------------------------------

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        path = self.tmp / f"{name}.log"
        with path.open("ab") as log:
            proc = subprocess.Popen(
                [str(BIN), *args],
                env=self.env,
                cwd=self.tmp,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        register(f"grassroots {name}", path, proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start_server(self) -> None:
        self.spawn("serve", "serve", "--port", str(self.port))
        wait_until(self._healthy, timeout=30, what="the receiver")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def start_worker(self, name: str = "worker", concurrency: int = 2) -> subprocess.Popen[bytes]:
        proc = self.spawn(name, "worker", "--concurrency", str(concurrency), "-l", "info")
        wait_until(lambda: "ready." in self.log(name), timeout=60, what=f"{name} ready")
        return proc

    def start_beat(self) -> None:
        self.spawn("beat", "beat")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, sig)
        proc.wait(30)

    def stop(self) -> None:
        # The stack is thrown away with its database: no need to wait for a graceful shutdown.
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        self.redis.stop()

    # interfaces -----------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN), *args],
            env=self.env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"grassroots {' '.join(args)} failed: {result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args).stdout)

    def post(self, event: dict[str, Any] | bytes, **headers: str) -> httpx.Response:
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        sent = {"content-type": "application/json", **signed_headers(SECRET, body), **headers}
        return httpx.post(f"{self.base}/webhooks/clever", content=body, headers=sent, timeout=30)

    def ops(self, method: str, path: str) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.base}{path}",
            timeout=30,
            headers={"authorization": f"Bearer {OPS_TOKEN}"},
        )

    def _ops_json(self, path: str) -> dict[str, Any]:
        response = self.ops("GET", path)
        assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
        data: dict[str, Any] = response.json()
        return data

    def status(self) -> dict[str, Any]:
        """The ops API's status (the same object ``grassroots status --json`` prints)."""
        return self._ops_json("/ops/status")

    def wait_idle(self, timeout: float = 60) -> dict[str, Any]:
        return wait_until(
            lambda: (s := self.status())["pending"] == 0 and s,
            timeout=timeout,
            what="the pipeline to go idle",
        )

    def account(self, account_id: str) -> dict[str, Any]:
        return self._ops_json(f"/ops/accounts/{account_id}")

    def event(self, event_id: str) -> dict[str, Any]:
        return self._ops_json(f"/ops/events/{event_id}")


@contextmanager
def running_stack(
    tmp_path: Path,
    database_url: str,
    *,
    seed: Path | None = None,
    workers: int = 1,
    server: bool = True,
    beat: bool = False,
    persistent_redis: bool = False,
    **env: str,
) -> Iterator[Stack]:
    stack = Stack(tmp_path, database_url, persistent_redis=persistent_redis, **env)
    try:
        stack.redis.start()
        if seed is not None:
            stack.cli("seed", str(seed))
        if server:
            stack.start_server()
        for n in range(workers):
            stack.start_worker(f"worker{n}")
        if beat:
            stack.start_beat()
        yield stack
    finally:
        stack.stop()


def clever_event(
    event_id: str,
    type_: str,
    obj: dict[str, Any],
    *,
    created: str,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": obj}
    if previous is not None:
        data["previous_attributes"] = previous
    return {"id": event_id, "type": type_, "created": created, "data": data}


def answers_health(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def serving(
    workdir: Path, *args: str, ports: tuple[int, ...], **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``grassroots serve ARGS`` in ``workdir`` (its log in serve.log) until each of ``ports``
    answers /healthz; stopped (SIGTERM) after."""
    log = workdir / "serve.log"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(BIN), "serve", *args],
            cwd=workdir,
            env={**inherited, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    register("grassroots serve", log, proc)
    try:
        for port in ports:
            wait_until(
                lambda p=port: answers_health(p) or proc.poll() is not None,  # type: ignore[misc]
                timeout=30,
                what=f"serve on port {port}",
            )
            assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        if proc.poll() is None:
            terminate_group(proc, within=15)
