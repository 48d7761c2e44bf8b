"""``grassroots serve`` for real, from loopback: the webhook and the ops API on two listeners of
one process, the headers of every answer, and the limits of the published listener against a
hostile client (``worker.connection_limits``), each at its shipped value."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.databases import PgDatabases
from tests.support.stack import (
    BIN,
    OPS_TOKEN,
    SECRET,
    RedisServer,
    serving,
    spare_port,
    wait_until,
)
from worker import connection_limits

AUTH = {"Authorization": f"Bearer {OPS_TOKEN}"}
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: grassroots\r\n\r\n"


@dataclass
class Serving:
    public: int
    ops: int
    log: Path

    def get(self, port: int, path: str, **headers: str) -> httpx.Response:
        # Redirects are what is tested, never followed.
        return httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10)

    def cuts(self) -> dict[str, int]:
        """Cut connections by reason, as /metrics says (a scrape may be some seconds old)."""
        text = self.get(self.ops, "/metrics", **AUTH).text
        return {
            reason: int(float(n))
            for reason, n in re.findall(
                r'^grassroots_http_connections_cut_total\{reason="(\w+)"\} (\S+)$', text, re.M
            )
        }


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, pg_databases: PgDatabases
) -> Iterator[Serving]:
    workdir = tmp_path_factory.mktemp("serve")
    public, ops = spare_port(), spare_port()
    with (
        RedisServer(workdir) as broker,
        serving(
            workdir,
            "--port",
            str(public),
            "--ops-port",
            str(ops),
            ports=(public, ops),
            DATABASE_URL=pg_databases.new(),
            BROKER_URL=broker.url,
            OPS_TOKEN=OPS_TOKEN,
            WEBHOOK_SECRETS=SECRET,
        ),
    ):
        yield Serving(public, ops, workdir / "serve.log")


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=60)


def closed_after(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, answer = time.monotonic(), b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer, time.monotonic() - started


# --- two listeners ---------------------------------------------------------------------------


@pytest.mark.slow
def test_the_public_listener_serves_the_webhook_and_health_alone(server: Serving) -> None:
    webhook = httpx.post(f"http://127.0.0.1:{server.public}/webhooks/clever", timeout=10)
    assert webhook.status_code == 415  # served: it asks for JSON
    assert server.get(server.public, "/healthz").status_code == 200
    for path in ("/ops/status", "/metrics", "/ops/events"):
        assert server.get(server.public, path, **AUTH).status_code == 404, path


@pytest.mark.slow
def test_the_ops_listener_serves_the_ops_api_and_metrics_not_the_webhook(server: Serving) -> None:
    assert server.get(server.ops, "/ops/status").status_code == 401
    assert server.get(server.ops, "/metrics").status_code == 401
    assert server.get(server.ops, "/metrics", **AUTH).status_code == 200
    assert server.get(server.ops, "/healthz").status_code == 200
    webhook = httpx.post(f"http://127.0.0.1:{server.ops}/webhooks/clever", timeout=10)
    assert webhook.status_code in (404, 405)


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


@pytest.mark.slow
def test_the_ops_listener_is_on_loopback_unless_told(server: Serving) -> None:
    assert listening_addresses(server.ops) == {"127.0.0.1"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--routes", "webhooks"], "--ops-port splits the routes itself"),
        (["--workers", "2"], "--workers serves one listener"),
        (["--port", "8123", "--ops-port", "8123"], "--ops-port and --port must differ"),
    ],
)
def test_serve_refuses_options_that_do_not_go_with_a_second_listener(
    tmp_path: Path, args: list[str], message: str
) -> None:
    ops = [] if "--ops-port" in args else ["--ops-port", str(spare_port())]
    result = subprocess.run(
        [str(BIN), "serve", *args, *ops],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


# --- the headers of every answer -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "auth", "status"),
    [
        ("/ops/status", {}, 401),
        ("/ops/events?limit=1", AUTH, 200),
        ("/metrics", AUTH, 200),
        ("/healthz", {}, 200),
        ("/no-such-page", AUTH, 404),
        ("/console/", {}, 200),
        ("/console/events", {}, 303),
        ("/console/static/console.css", {}, 200),
    ],
)
def test_ops_answers_are_never_stored_nor_sniffed(
    server: Serving, path: str, auth: dict[str, str], status: int
) -> None:
    response = server.get(server.ops, path, **auth)
    assert response.status_code == status, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.slow
@pytest.mark.parametrize("host", ["evil.example", "evil.example:8001", "127.0.0.1"])
def test_a_redirect_never_echoes_the_requests_host(server: Serving, host: str) -> None:
    response = server.get(server.ops, "/ops/status/", Host=host, **AUTH)
    assert response.status_code == 307
    assert response.headers["location"] == "/ops/status"


# --- the published listener against a hostile client ---------------------------------------


@pytest.mark.slow
def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(
    server: Serving,
) -> None:
    with connect(server.public) as idle:
        answer, took = closed_after(idle)
    assert answer == b""  # nothing asked, nothing answered
    assert connection_limits.HEAD_TIMEOUT - 0.5 <= took <= connection_limits.HEAD_TIMEOUT + 5


@pytest.mark.slow
def test_a_head_sent_a_byte_a_second_is_cut_with_408_at_the_head_timeout(server: Serving) -> None:
    sent: list[int] = []
    with connect(server.public) as slow:

        def trickle() -> None:
            try:
                for byte in HEALTH:
                    slow.sendall(bytes([byte]))
                    sent.append(byte)
                    time.sleep(1)
            except OSError:
                return  # closed by the server

        threading.Thread(target=trickle, daemon=True).start()
        answer, took = closed_after(slow)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert connection_limits.HEAD_TIMEOUT - 0.5 <= took <= connection_limits.HEAD_TIMEOUT + 5
    assert len(sent) < len(HEALTH)


@pytest.mark.slow
def test_a_body_sent_a_byte_a_second_is_cut_with_408_at_the_body_timeout(server: Serving) -> None:
    with connect(server.public) as slow:
        slow.sendall(
            b"POST /webhooks/clever HTTP/1.1\r\nHost: grassroots\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )

        def trickle() -> None:
            try:
                for _ in range(1000):
                    slow.sendall(b" ")
                    time.sleep(1)
            except OSError:
                return

        threading.Thread(target=trickle, daemon=True).start()
        answer, took = closed_after(slow)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert connection_limits.BODY_TIMEOUT - 0.5 <= took <= connection_limits.BODY_TIMEOUT + 5


@pytest.mark.slow
def test_a_head_over_the_cap_is_refused_with_431_before_the_rest_is_read(server: Serving) -> None:
    with connect(server.public) as big:
        big.sendall(HEALTH[:-2])
        # A 100 MB header, as fast as the server takes it.
        sent, chunk = 0, b"X-Big: " + b"a" * 65536
        try:
            while sent < 100_000_000:
                big.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        answer, _ = closed_after(big)
    assert answer.startswith(b"HTTP/1.1 431 ")
    # Cut once past the cap: what got through is what the kernel's buffers held on the way.
    assert sent < 16_000_000
    # A head just under the cap is read.
    header = b"X-Fill: " + b"a" * (connection_limits.MAX_HEAD_BYTES - len(HEALTH) - 64) + b"\r\n"
    with connect(server.public) as fine:
        fine.sendall(HEALTH[:-2] + header + b"Connection: close\r\n\r\n")
        answer, _ = closed_after(fine)
    assert answer.startswith(b"HTTP/1.1 200 ")


@pytest.mark.slow
def test_a_later_request_on_a_kept_alive_connection_is_held_to_the_same_cap(
    server: Serving,
) -> None:
    with connect(server.public) as kept:
        kept.sendall(HEALTH)
        first = b""
        while b"\r\n\r\n" not in first or not first.endswith(b'{"status":"ok"}'):
            first += kept.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        # Whole, in one write: measured once parsed.
        big = b"X-Big: " + b"a" * (connection_limits.MAX_HEAD_BYTES + 1024) + b"\r\n\r\n"
        kept.sendall(HEALTH[:-2] + big)
        answer, _ = closed_after(kept)
    assert answer.startswith(b"HTTP/1.1 431 ")


@pytest.mark.slow
def test_at_the_connection_cap_the_oldest_idle_connection_makes_room(server: Serving) -> None:
    cap = connection_limits.connection_cap()
    with ExitStack() as stack:
        idle = [stack.enter_context(connect(server.public)) for _ in range(cap)]
        # A request still answers at once, on a new connection.
        started = time.monotonic()
        assert server.get(server.public, "/healthz").status_code == 200
        assert time.monotonic() - started < 5
        # The one that made room: the longest waiting, closed without an answer.
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b""
        # The ops listener has its own cap: untouched by the flood.
        assert server.get(server.ops, "/healthz").status_code == 200


@pytest.mark.slow
def test_at_the_cap_with_every_request_being_answered_a_new_connection_gets_503(
    server: Serving,
) -> None:
    cap = connection_limits.connection_cap()
    before = server.cuts().get("over_capacity", 0)
    with ExitStack() as stack:
        for _ in range(cap):
            # Its head read, its body awaited: not a connection to close for another.
            busy = stack.enter_context(connect(server.public))
            busy.sendall(
                b"POST /webhooks/clever HTTP/1.1\r\nHost: grassroots\r\n"
                b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n"
            )
        with connect(server.public) as late:
            late.sendall(HEALTH)
            answer, _ = closed_after(late)
        aborted = server.cuts().get("aborted", 0)
    assert answer.startswith(b"HTTP/1.1 503 ")
    wait_until(
        lambda: server.cuts()["over_capacity"] == before + 1, timeout=30, what="the refusal counted"
    )
    # Closed here with their bodies unsent: each is an aborted upload.
    wait_until(
        lambda: server.cuts()["aborted"] == aborted + cap, timeout=30, what="the aborts counted"
    )


@pytest.mark.slow
def test_aborted_uploads_are_counted_and_logged_once_never_traced(server: Serving) -> None:
    before = server.cuts().get("aborted", 0)
    logged = len(server.log.read_text())
    for _ in range(200):
        with connect(server.public) as aborted:
            aborted.sendall(
                b"POST /webhooks/clever HTTP/1.1\r\nHost: grassroots\r\n"
                b'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"id": '
            )
    wait_until(
        lambda: server.cuts().get("aborted", 0) == before + 200,
        timeout=30,
        what="200 aborted uploads counted",
    )
    log = server.log.read_text()
    assert "Traceback" not in log
    assert '"level": "error"' not in log
    # One line a minute at most, a warning with the count.
    assert sum("(aborted)" in line for line in log[logged:].splitlines()) <= 1
    lines = [line for line in log.splitlines() if "(aborted)" in line]
    assert lines and all('"level": "warning"' in line for line in lines)
