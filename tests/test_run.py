"""The README's main job: `grassroots run` brings the whole stack up on embedded defaults, the demo
works against it, Ctrl-C stops everything, and a child that dies is reported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.stack import RedisServer, spare_port, wait_until

pytestmark = pytest.mark.slow
GRASSROOTS = Path(sys.executable).parent / "grassroots"


class Run:
    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.port, self.flower, self.redis_port = spare_port(), spare_port(), spare_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "WEBHOOK_SECRETS", "OPS_TOKEN")
        }
        self.env = {**env, "BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0"}
        self.log = cwd / "run.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(GRASSROOTS),
                    "run",
                    "--port",
                    str(self.port),
                    "--flower-port",
                    str(self.flower),
                ],
                cwd=cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        try:
            up = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
            flower = httpx.get(f"http://127.0.0.1:{self.flower}/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
        return up and flower and "celery@" in self.output() and "ready" in self.output()


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


def test_run_starts_everything_and_the_demo_converts_through_it(stack: Run) -> None:
    assert (stack.cwd / "var" / "webhook-secret").read_text().startswith("whsec_")
    assert oct((stack.cwd / "var" / "ops-token").stat().st_mode & 0o777) == "0o600"
    assert "starting a private redis-server" in stack.output()
    demo = subprocess.run(
        [str(GRASSROOTS), "demo", "--url", f"http://127.0.0.1:{stack.port}/webhooks/clever"],
        cwd=stack.cwd,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert demo.returncode == 0, demo.stderr
    after = demo.stdout.split("after", 1)[1]
    assert "Steve (student)              grassroots" in after
    assert "roles=teacher" in after and "district reports=denied" in after

    os.killpg(stack.proc.pid, signal.SIGINT)
    assert stack.proc.wait(60) == 0
    assert "run | stopped" in stack.output()
    assert not RedisServer(stack.cwd, stack.redis_port).ping()


def test_a_child_that_dies_is_reported_and_stops_the_stack(stack: Run) -> None:
    flower = subprocess.run(
        ["pgrep", "-f", f"flower --port {stack.flower}"], capture_output=True, text=True, check=True
    )
    os.kill(int(flower.stdout.split()[0]), signal.SIGKILL)
    assert stack.proc.wait(60) == 1
    assert "flower exited with status" in stack.output()
    assert "run | stopped" in stack.output()
