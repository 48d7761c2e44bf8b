"""The README's main job: `grassroots run` brings the whole stack up on embedded defaults, the
CLI in another shell finds it from the same directory, the demo works against it, a second run
beside it is refused, Ctrl-C stops everything, and a child that dies is reported."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.cli import no_stack, tree
from tests.support.process_logs import register
from tests.support.stack import RedisServer, spare_port, wait_until
from worker.settings import ENVIRONMENT_VARIABLES

pytestmark = pytest.mark.slow
GRASSROOTS = Path(sys.executable).parent / "grassroots"


class Run:
    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.port, self.flower, self.redis_port = spare_port(), spare_port(), spare_port()
        self.ops = spare_port()
        # A shell that exports none of the application's variables: all defaults, but a broker
        # of the stack's own on a spare port.
        self.bare = {
            k: v
            for k, v in os.environ.items()
            if k not in ENVIRONMENT_VARIABLES and not k.startswith("PYTEST")
        }
        self.env = {**self.bare, "BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0"}
        self.log = cwd / "run.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(GRASSROOTS),
                    "run",
                    "--port",
                    str(self.port),
                    "--ops-port",
                    str(self.ops),
                    "--flower-port",
                    str(self.flower),
                ],
                cwd=cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        register("grassroots run", self.log, self.proc)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def flower_credentials(self) -> tuple[str, str] | None:
        try:
            kept = (self.cwd / "var" / "flower-basic-auth").read_text()
        except FileNotFoundError:
            return None
        user, _, password = kept.strip().partition(":")
        return user, password

    def ready(self) -> bool:
        credentials = self.flower_credentials()
        if credentials is None:
            return False
        try:
            up = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
            page = httpx.get(f"http://127.0.0.1:{self.flower}/", auth=credentials, timeout=1)
        except httpx.HTTPError:
            return False
        # The worker's node name is its own: grassroots-<pid>@<host>, not celery@<host>.
        worker_ready = re.search(r"grassroots-\d+@\S+ ready\.", self.output())
        return up and page.status_code == 200 and worker_ready is not None

    def cli(
        self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``grassroots`` in another shell, by default in the stack's directory with nothing
        exported at all."""
        return subprocess.run(
            [str(GRASSROOTS), *args],
            cwd=cwd or self.cwd,
            env=self.bare if env is None else env,
            capture_output=True,
            text=True,
            timeout=120,
        )


def command_lines() -> list[str]:
    """Every process's command line (``/proc/<pid>/cmdline``: what `ps` shows every user)."""
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found.append(path.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # ended meanwhile
            continue
    return found


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Run]:
    run = Run(tmp_path)
    try:
        wait_until(run.ready, timeout=90, what=f"the stack to come up:\n{run.output()[-3000:]}")
        yield run
    finally:
        # Its children run in sessions of their own: stop it the way a person would, so it
        # stops them, and only then make sure.
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGINT)
            try:
                run.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(run.proc.pid, signal.SIGKILL)
                run.proc.wait(10)


def _secrets_kept_in_the_home_and_nowhere_else(stack: Run) -> tuple[str, str, str]:
    """The secrets the run generated, each in its own file in the home, mode 600, and never in
    its output or on a command line; its redis requires its password. Returns the ops token and
    Flower's user and password."""
    home = stack.cwd / "var"
    secret = (home / "webhook-secret").read_text().strip()
    token = (home / "ops-token").read_text().strip()
    user, password = stack.flower_credentials() or ("", "")
    assert secret.startswith("whsec_") and token and user and password
    redis_password = (home / "redis-password").read_text().strip()
    for name in ("webhook-secret", "ops-token", "flower-basic-auth", "redis-password"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
        # Where each is kept is said, what it is never.
        assert f"run | generated the {name.replace('-', ' ')}: {home / name} (mode 600)" in (
            stack.output()
        )
    # Its private redis requires that password; the URL with it is kept for the commands.
    assert stat.S_IMODE((home / "broker-url").stat().st_mode) == 0o600
    broker = f"redis://:{redis_password}@127.0.0.1:{stack.redis_port}/0"
    assert (home / "broker-url").read_text().strip() == broker
    with redis.Redis(port=stack.redis_port) as anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with redis.Redis.from_url(broker) as client:
        assert client.ping()
    for value in (secret, token, password, redis_password):
        assert value not in stack.output()
        # Nor on any process's command line, which `ps` shows every user of the machine.
        for cmdline in command_lines():
            assert value not in cmdline
    return token, user, password


def test_run_starts_everything_and_the_demo_converts_through_it(stack: Run) -> None:
    home = stack.cwd / "var"
    token, user, password = _secrets_kept_in_the_home_and_nowhere_else(stack)

    # Flower is behind its basic auth on loopback too: no task is sent without it.
    flower = f"http://127.0.0.1:{stack.flower}"
    sneak = httpx.post(f"{flower}/api/task/async-apply/grassroots.district_exit", json={})
    assert sneak.status_code == 401
    assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{flower}/api/workers", auth=(user, password), timeout=10).status_code == 200
    assert f"find this stack by themselves (from elsewhere: --home {home})" in stack.output()
    # No noise on every start: Celery's warning to a root worker about pickle (ours takes JSON
    # only; these tests run as root in CI's containers) and Flower's complaint that no worker
    # answered its first questions (the worker starts beside it).
    assert "superuser privileges" not in stack.output()
    assert "Inspect method" not in stack.output()
    assert "starting a private redis-server" in stack.output()

    # A second run beside it: refused before it makes or starts anything.
    second = stack.cli(
        "run",
        *("--port", str(stack.port), "--ops-port", str(stack.ops)),
        *("--flower-port", str(stack.flower)),
        env=stack.env,
    )
    assert second.returncode == 1
    assert second.stderr == (
        f"grassroots: port {stack.port} (the receiver) is already in use on 127.0.0.1: another"
        " `grassroots run` may be running; stop it, or pick another port with --port\n"
    )
    assert second.stdout == ""
    assert stack.ready()

    # On ports of its own, found from the same directory with no --url: the run recorded them.
    assert json.loads((home / "listeners.json").read_text()) == {
        "receiver": f"http://127.0.0.1:{stack.port}",
        "ops": f"http://127.0.0.1:{stack.ops}",
        "flower": f"http://127.0.0.1:{stack.flower}",
    }
    # The webhook's listener serves nothing else; the ops API is on its own, on loopback.
    auth = {"Authorization": f"Bearer {token}"}
    receiver, ops = f"http://127.0.0.1:{stack.port}", f"http://127.0.0.1:{stack.ops}"
    assert httpx.get(f"{receiver}/ops/status", headers=auth, timeout=10).status_code == 404
    assert httpx.get(f"{ops}/ops/status", headers=auth, timeout=10).status_code == 200
    assert httpx.get(f"{ops}/metrics", headers=auth, timeout=10).status_code == 200
    demo = stack.cli("demo")
    assert demo.returncode == 0, demo.stderr
    # It counts what it seeded as `seed` does, in the same words.
    assert (
        "seeded the example district (idempotent): 1 districts, 8 users, 3 sections, 1 accounts,"
        " 2 classes, 2 goals, 3 assignments, 6 progress\n"
    ) in demo.stdout
    after = demo.stdout.split("after", 1)[1]
    assert "Steve (student)              grassroots" in after
    assert "roles=teacher" in after and "district reports=denied" in after
    # The demo's removal used this 6-person district's brake allowance for the day: it says so.
    assert (
        "The removal brake (REMOVAL_BRAKE_PERCENT=10% of its accounts in 24 h, at least one a"
        " day) now allows no more removals in this district" in after
    )

    os.killpg(stack.proc.pid, signal.SIGINT)
    assert stack.proc.wait(60) == 0
    assert "run | stopped" in stack.output()
    assert not RedisServer(stack.cwd, stack.redis_port).ping()


def test_the_cli_in_another_shell_finds_the_stack_from_its_directory(stack: Run) -> None:
    event: dict[str, Any] = {
        "id": "from-another-shell",
        "type": "users.updated",
        "created": "2025-09-03T14:05:21.900Z",
        "data": {"object": {"id": "nobody-known", "district": "no-district"}},
    }
    (stack.cwd / "event.json").write_text(json.dumps(event))

    # Nothing exported, not even the broker: the secret and the database are the home's.
    # Nothing exported and no --url: the receiver's address is the one the run recorded.
    sent = stack.cli("send-webhook", "event.json")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.startswith("202 ")

    def processed() -> str:
        shown = stack.cli("events", "show", event["id"])
        assert shown.returncode == 0, shown.stderr
        final: str = json.loads(shown.stdout)["status"]
        return "" if final in ("accepted", "processing") else final

    assert wait_until(processed, timeout=60, what="the event to be processed") == "ignored"
    status = stack.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["events"]["ignored"] == 1
    # Its broker too: the private redis, with the password the home keeps.
    assert json.loads(status.stdout)["broker"] == "ok"

    # From another directory: no stack there, and nothing made there; --home names this one.
    elsewhere = stack.cwd / "elsewhere"
    elsewhere.mkdir()
    lost = stack.cli("status", "--json", cwd=elsewhere)
    assert lost.returncode == 1
    assert lost.stderr == f"grassroots: {no_stack(elsewhere.resolve() / 'var')}\n"
    assert tree(elsewhere) == []
    found = stack.cli("--home", str(stack.cwd / "var"), "status", "--json", cwd=elsewhere)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["events"]["ignored"] == 1


def test_a_child_that_dies_is_reported_and_stops_the_stack(stack: Run) -> None:
    flower = subprocess.run(
        ["pgrep", "-f", f"flower --port {stack.flower}"], capture_output=True, text=True, check=True
    )
    os.kill(int(flower.stdout.split()[0]), signal.SIGKILL)
    assert stack.proc.wait(60) == 1
    assert "flower exited with status" in stack.output()
    assert "run | stopped" in stack.output()
