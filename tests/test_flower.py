"""``grassroots flower`` for real: basic auth on its UI and API, the depth of each of our named
queues, and the refusal to listen anywhere, loopback included, without credentials, which never
appear on its command line (SPEC §5.6, §5.7, §7)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.process_logs import register
from tests.support.stack import (
    BIN,
    FLOWER_BASIC_AUTH,
    FLOWER_PASSWORD,
    FLOWER_USER,
    RedisServer,
    spare_port,
    terminate_group,
    wait_until,
)
from worker.celery_app import QUEUES, app

pytestmark = pytest.mark.slow

CREDENTIALS = (FLOWER_USER, FLOWER_PASSWORD)
# /metrics included: Flower itself serves it without a login (worker.flower_app).
PROTECTED = ("/", "/api/workers", "/api/queues/length", "/metrics")
# Addresses that listen on every interface (Tornado takes "" so too).
EVERY_INTERFACE = ("0.0.0.0", "::", "")  # noqa: S104
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def clean_env(**env: str) -> dict[str, str]:
    # Flower takes any FLOWER_* variable as an option: only the test's own may reach it.
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "FLOWER_", "BROKER_"))
    }
    return {**inherited, **env}


@dataclass
class Flower:
    base: str
    broker: RedisServer
    pid: int

    def get(self, path: str, auth: tuple[str, str] | None = None) -> httpx.Response:
        return httpx.get(f"{self.base}{path}", auth=auth, timeout=10)

    def post(self, path: str, auth: tuple[str, str] | None = None) -> httpx.Response:
        return httpx.post(f"{self.base}{path}", json={}, auth=auth, timeout=10)

    def queue_depths(self) -> dict[str, int]:
        response = self.get("/api/queues/length", auth=CREDENTIALS)
        assert response.status_code == 200, response.text
        return {q["name"]: q["messages"] for q in response.json()["active_queues"]}


# One broker and one Flower for the module: starting Flower takes seconds, and only
# test_flower_reports_the_depth_of_each_named_queue puts anything in the broker (after emptying it).
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flower")


@pytest.fixture(scope="module")
def broker(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_flower(broker: RedisServer, workdir: Path) -> Iterator[Flower]:
    port = spare_port()
    log = workdir / f"flower-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN), "flower", "--address", "127.0.0.1", "--port", str(port)],
            env=clean_env(BROKER_URL=broker.url, FLOWER_BASIC_AUTH=FLOWER_BASIC_AUTH),
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    register("grassroots flower", log, proc)
    running = Flower(f"http://127.0.0.1:{port}", broker, proc.pid)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"flower exited {proc.returncode}: {log.read_text()}")
        try:
            # Flower's one page without credentials, and what docker-compose.yml's healthcheck asks.
            return running.get("/healthcheck").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=60, what="flower")
        yield running
    finally:
        if proc.poll() is None:
            terminate_group(proc, within=15)


@pytest.fixture(scope="module")
def flower(broker: RedisServer, workdir: Path) -> Iterator[Flower]:
    with running_flower(broker, workdir) as running:
        yield running


@pytest.mark.parametrize("path", PROTECTED)
def test_flower_refuses_requests_without_valid_credentials(flower: Flower, path: str) -> None:
    assert flower.get(path).status_code == 401
    assert flower.get(path, auth=(FLOWER_USER, "wrong")).status_code == 401
    assert flower.get(path, auth=("intruder", FLOWER_PASSWORD)).status_code == 401


def test_flower_api_sends_no_task_without_credentials_even_on_loopback(flower: Flower) -> None:
    # What a local process, or a web page open in a browser on this machine, could send.
    for path in (
        "/api/task/async-apply/grassroots.district_exit",
        "/api/task/send-task/grassroots.district_exit",
    ):
        assert flower.post(path).status_code == 401
        assert flower.post(path, auth=(FLOWER_USER, "wrong")).status_code == 401
    with redis.Redis.from_url(flower.broker.url) as client:
        assert client.llen("fanout") == 0


def test_flower_api_sends_a_task_with_credentials(flower: Flower) -> None:
    with redis.Redis.from_url(flower.broker.url) as client:
        client.delete(*QUEUES)
        response = flower.post("/api/task/send-task/grassroots.purge", auth=CREDENTIALS)
        assert response.status_code == 200, response.text
        assert client.llen("maintenance") == 1
        client.delete(*QUEUES)


def test_flower_credentials_are_not_on_its_command_line(flower: Flower) -> None:
    # /proc/<pid>/cmdline is what `ps` shows every user of the machine.
    cmdline = Path(f"/proc/{flower.pid}/cmdline").read_bytes().decode()
    assert "flower" in cmdline
    assert FLOWER_PASSWORD not in cmdline


def test_flower_ui_asks_a_browser_for_credentials(flower: Flower) -> None:
    response = flower.get("/")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Basic ")


@pytest.mark.parametrize("path", PROTECTED)
def test_flower_answers_requests_with_valid_credentials(flower: Flower, path: str) -> None:
    assert flower.get(path, auth=CREDENTIALS).status_code == 200


def test_flower_metrics_are_prometheus_text_behind_its_login(flower: Flower) -> None:
    response = flower.get("/metrics", auth=CREDENTIALS)
    assert response.status_code == 200
    assert "# TYPE flower_" in response.text
    assert flower.get("/metrics").headers["www-authenticate"].startswith("Basic ")


@pytest.mark.parametrize(
    ("path", "auth", "status"),
    [
        ("/healthcheck", None, 200),
        ("/", None, 401),
        ("/", CREDENTIALS, 200),
        ("/metrics", CREDENTIALS, 200),
        ("/static/css/flower.css", None, 200),
        ("/no-such-page", CREDENTIALS, 404),
    ],
)
def test_flower_says_no_version_in_its_server_header(
    flower: Flower, path: str, auth: tuple[str, str] | None, status: int
) -> None:
    response = flower.get(path, auth=auth)
    assert response.status_code == status
    assert "server" not in response.headers, response.headers["server"]
    assert "tornado" not in str(response.headers).lower()


def test_flower_reads_queue_depths_from_a_redis_that_requires_a_password(tmp_path: Path) -> None:
    with RedisServer(tmp_path, password="a-redis-password-for-flower") as guarded:
        with redis.Redis.from_url(guarded.url) as client:
            client.rpush("conversions", "x", "y")
        with running_flower(guarded, tmp_path) as running:
            assert running.queue_depths()["conversions"] == 2
            log = next(tmp_path.glob("flower-*.log")).read_text()
    assert "a-redis-password-for-flower" not in log


def test_flower_reports_the_depth_of_each_named_queue(flower: Flower) -> None:
    with redis.Redis.from_url(flower.broker.url) as client:
        client.delete(*QUEUES)
    # No worker is running: Flower knows our queues from the app's configuration.
    assert flower.queue_depths() == dict.fromkeys(QUEUES, 0)
    # Sent by our own app and its routes (grassroots.purge goes to maintenance), over a
    # connection to the private broker only.
    with app.connection_for_write(flower.broker.url) as connection:
        app.send_task("grassroots.purge", connection=connection)
        for _ in range(2):
            app.send_task("grassroots.purge", queue="conversions", connection=connection)
    assert flower.queue_depths() == {"events": 0, "conversions": 2, "fanout": 0, "maintenance": 1}


def start_flower(tmp_path: Path, address: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``grassroots flower`` on ``address``, expected to refuse before it ever reaches a broker."""
    return subprocess.run(
        [str(BIN), "flower", "--address", address, "--port", str(spare_port())],
        env=clean_env(BROKER_URL="redis://127.0.0.1:1/0", **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("address", EVERY_INTERFACE + LOOPBACK)
def test_flower_will_not_listen_anywhere_without_basic_auth(tmp_path: Path, address: str) -> None:
    result = start_flower(tmp_path, address)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"grassroots: refusing to serve Flower on {address or 'every interface'} without"
        " FLOWER_BASIC_AUTH (user:password)"
    ]


STRONG = "a-password-of-22-chars"


@pytest.mark.parametrize(
    ("auth", "problem"),
    [
        ("user", "must be user:password, neither empty (several: comma-separated)"),
        ("user:", "must be user:password, neither empty (several: comma-separated)"),
        (f":{STRONG}", "must be user:password, neither empty (several: comma-separated)"),
        (":", "must be user:password, neither empty (several: comma-separated)"),
        (f"user:{STRONG},bob", "must be user:password, neither empty (several: comma-separated)"),
        ("user:tiny-pw", "the password of credential 1 must be at least 16 characters"),
        (f"user:{STRONG},bob:weak-pw", "the password of credential 2 must be at least 16"),
    ],
)
def test_flower_refuses_basic_auth_without_a_user_and_a_strong_password(
    tmp_path: Path, auth: str, problem: str
) -> None:
    for address in (EVERY_INTERFACE[0], LOOPBACK[0]):
        result = start_flower(tmp_path, address, FLOWER_BASIC_AUTH=auth)
        assert result.returncode == 1
        assert result.stderr.startswith(f"grassroots: FLOWER_BASIC_AUTH: {problem}")
        for secret in ("tiny-pw", "weak-pw", STRONG):
            assert secret not in result.stderr
