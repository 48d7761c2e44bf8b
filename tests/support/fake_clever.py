"""A Clever-shaped Events API for tests: a threaded HTTP server on a spare 127.0.0.1 port.

It serves ``GET /v3.0/events`` the way Clever's v3 API does: each district's feed read with
that district's bearer token, oldest first, ``starting_after`` / ``ending_before`` (``last``
included) and ``limit``, each item nested in its own ``data`` (or bare, with ``wrap=False``),
``links`` with ``rel: next`` while a page is not empty, 401 for an unknown token and 404 for a
cursor outside the window. Tests script failures per district (429 with reset headers, 5xx,
slow or stalled answers) and read back every request it received.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

EVENTS = "/v3.0/events"


@dataclass
class Scripted:
    """A response served, once, to the district's next request (to its next request asking for
    what comes after ``after``, when set) instead of the feed."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    after: str | None = None
    # 429: X-RateLimit-Reset is set this many seconds ahead, rounded up to a whole epoch second.
    reset_in: float | None = None
    # Answer the real page, but only after this many seconds (a client read timeout).
    delay: float = 0.0
    # Answer the real page, but send only its first half until this event is set.
    stall: threading.Event | None = None


@dataclass(frozen=True)
class Seen:
    district: str | None  # None: a token the server does not know
    query: dict[str, str]
    at: float  # time.time() when the request arrived
    status: int
    reset: int | None = None  # the X-RateLimit-Reset sent, for a 429


def item_id(item: dict[str, Any]) -> str:
    event = item["data"] if "type" not in item else item
    return str(event["id"])


class FakeClever:
    def __init__(self, *, wrap: bool = True, max_page: int = 1000) -> None:
        self.wrap = wrap
        self.max_page = max_page
        self._tokens: dict[str, str] = {}
        self._feeds: dict[str, list[dict[str, Any]]] = {}
        self._expired: dict[str, int] = {}
        self._scripts: dict[str, list[Scripted]] = {}
        self._seen: list[Seen] = []
        self._stalls: list[threading.Event] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    # lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> FakeClever:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for stall in self._stalls:
            stall.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # scripting -----------------------------------------------------------------------------

    def district(self, district_id: str, token: str) -> None:
        with self._lock:
            self._tokens[token] = district_id
            self._feeds.setdefault(district_id, [])
            self._expired.setdefault(district_id, 0)

    def add(self, district_id: str, *events: dict[str, Any]) -> None:
        """Append events to the district's feed, served wrapped or bare as configured."""
        self.add_items(
            district_id,
            *({"data": e, "uri": f"{EVENTS}/{e['id']}"} if self.wrap else e for e in events),
        )

    def add_items(self, district_id: str, *items: dict[str, Any]) -> None:
        """Append list items exactly as they are to be served."""
        with self._lock:
            self._feeds[district_id].extend(items)

    def expire(self, district_id: str, count: int) -> None:
        """The oldest ``count`` events leave the 30-day window: a cursor on them is unknown."""
        with self._lock:
            self._expired[district_id] += count

    def script(self, district_id: str, *responses: Scripted) -> None:
        with self._lock:
            self._scripts.setdefault(district_id, []).extend(responses)
            self._stalls.extend(r.stall for r in responses if r.stall is not None)

    def requests(self, district_id: str | None) -> list[Seen]:
        with self._lock:
            return [s for s in self._seen if s.district == district_id]

    def ids(self, district_id: str) -> list[str]:
        with self._lock:
            return [item_id(i) for i in self._feeds[district_id]]

    # serving -------------------------------------------------------------------------------

    def _take_script(self, district_id: str, query: dict[str, str]) -> Scripted | None:
        queue = self._scripts.get(district_id, [])
        for n, scripted in enumerate(queue):
            if scripted.after is None or scripted.after == query.get("starting_after"):
                return queue.pop(n)
        return None

    def respond(self, path: str, authorization: str) -> tuple[Scripted, dict[str, Any]]:
        """What to answer: the scripted response (or a plain 200) and the JSON body."""
        url = urlsplit(path)
        query = dict(parse_qsl(url.query))
        token = authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else ""
        with self._lock:
            district = self._tokens.get(token)
            scripted = None
            if url.path != EVENTS:
                scripted, body = Scripted(404), {"error": "not found"}
            elif district is None:
                scripted, body = Scripted(401), {"error": "invalid token"}
            else:
                scripted = self._take_script(district, query)
                if scripted is not None and scripted.status != 200:
                    body = scripted.body or {"error": f"scripted {scripted.status}"}
                elif scripted is not None and scripted.body is not None:
                    body = scripted.body
                else:
                    status, body = self._page(district, query)
                    scripted = replace(scripted or Scripted(), status=status)
            reset = None
            if scripted.status == 429:
                reset = math.ceil(time.time() + (scripted.reset_in or 0.0))
                scripted.headers = {
                    "X-RateLimit-Reset": str(reset),
                    "X-RateLimit-Limit": "1200",
                    "X-RateLimit-Remaining": "0",
                    **scripted.headers,
                }
            self._seen.append(Seen(district, query, time.time(), scripted.status, reset))
        return scripted, body

    def _page(self, district: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        items = self._feeds[district][self._expired[district] :]
        ids = [item_id(i) for i in items]
        limit = min(int(query.get("limit", "100")), self.max_page)
        if "ending_before" in query:
            before = query["ending_before"]
            if before != "last" and before not in ids:
                return 404, {"error": "Resource not found"}
            end = len(items) if before == "last" else ids.index(before)
            start = max(0, end - limit)
        elif "starting_after" in query:
            after = query["starting_after"]
            if after not in ids:
                return 404, {"error": "Resource not found"}
            start = ids.index(after) + 1
        else:
            start = 0
        chunk = items[start : start + limit]
        links = [{"rel": "self", "uri": f"{EVENTS}?{urlencode(query)}"}]
        if chunk:
            after_last = urlencode({"starting_after": item_id(chunk[-1]), "limit": limit})
            links.append({"rel": "next", "uri": f"{EVENTS}?{after_last}"})
            links.append(
                {"rel": "prev", "uri": f"{EVENTS}?ending_before={item_id(chunk[0])}&limit={limit}"}
            )
        return 200, {"data": chunk, "links": links}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeClever


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        scripted, body = self.server.fake.respond(self.path, self.headers.get("Authorization", ""))
        payload = json.dumps(body).encode()
        if scripted.delay:
            time.sleep(scripted.delay)  # the slow server under test, not a test waiting
        try:
            self.send_response(scripted.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in scripted.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if scripted.stall is not None:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                scripted.stall.wait(60)
                self.wfile.write(payload[len(payload) // 2 :])
            else:
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (or was killed): nothing to do
