"""A Clever-shaped API for tests and benchmarks: a threaded HTTP server on a spare 127.0.0.1 port.

It serves, each district read with that district's bearer token, the way Clever's v3 API does:

- the Events API, ``GET /v3.0/events``: oldest first, ``starting_after`` / ``ending_before``
  (``last`` included) and ``limit``, each item nested in its own ``data`` (or bare, with
  ``wrap=False``), 404 for a cursor outside the window;
- the Data API (Clever's ``v3.0.yml``): ``GET /v3.0/districts/{id}`` (``{"data": District}``,
  404 for another district than the token's), ``GET /v3.0/users`` (``role`` filters) and
  ``GET /v3.0/sections``: items ``{"data": OBJECT, "uri"}`` in ascending id order, ``limit``
  (default 100; above ``data_max_page``, 10,000 as Clever's, the answer is 413 as Clever's),
  ``starting_after`` / ``ending_before`` (404 for an id no item has, unless ``range_cursors``),
  ``links`` rel=self always, rel=next and rel=prev while a page is not empty: the last page is
  empty. Links are paths on the API host, carrying the request's ``limit`` and ``role``.

Both lists answer 401 for an unknown token. A district's data is loaded from a roster snapshot
(``roster``, SPEC §5.1; ``platform`` and the project's ``policy`` are not Clever's and are left
out) and changed with ``put_users``, ``update_user``, ``drop_role``, ``remove_users``,
``put_sections``, ``update_section``, ``shrink_section``, ``remove_sections``.

Tests script failures per district, and per path if they like (``Scripted``: 429 with reset
headers, 5xx, 401, a body that is not JSON, a page without ``data``, a next link that repeats the
page or leaves the host, slow or stalled answers) and read back every request it received
(``requests``: path, query, status).
"""

from __future__ import annotations

import bisect
import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

EVENTS = "/v3.0/events"
USERS = "/v3.0/users"
SECTIONS = "/v3.0/sections"
DISTRICTS = "/v3.0/districts"

# Clever's page sizes for the Data API: 100 unless asked, at most 10,000 (above it, 413).
DATA_DEFAULT_PAGE = 100
DATA_MAX_PAGE = 10_000


def district_path(district_id: str) -> str:
    return f"{DISTRICTS}/{district_id}"


@dataclass
class Scripted:
    """A response served, once, to the district's next request (to its next request for ``path``
    and asking for what comes after ``after``, when set) instead of the real answer."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    after: str | None = None
    # Only a request for this path (EVENTS, USERS, SECTIONS, district_path(id)); None: any.
    path: str | None = None
    # 429: X-RateLimit-Reset is set this many seconds ahead, rounded up to a whole epoch second.
    reset_in: float | None = None
    # Answer the real page, but only after this many seconds (a client read timeout).
    delay: float = 0.0
    # Answer the real page, but send only its first half until this event is set.
    stall: threading.Event | None = None
    # Send these bytes as the body, whatever the status (a body that is not JSON).
    raw: bytes | None = None
    # Answer the real page passed through this (``without_data``, ``next_to``, ``next_repeats``).
    edit: Callable[[dict[str, Any]], Any] | None = None


def without_data(page: dict[str, Any]) -> dict[str, Any]:
    """A page that lost its ``data`` list (links kept)."""
    return {k: v for k, v in page.items() if k != "data"}


def next_repeats(page: dict[str, Any]) -> dict[str, Any]:
    """A page whose next link asks for the very same page again: it never moves forward."""
    own = next(link["uri"] for link in page["links"] if link["rel"] == "self")
    return _with_next(page, own)


def next_to(uri: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A page whose next link is ``uri`` (say, on another host)."""
    return lambda page: _with_next(page, uri)


def _with_next(page: dict[str, Any], uri: str) -> dict[str, Any]:
    links = [link for link in page.get("links", []) if link.get("rel") != "next"]
    return {**page, "links": [*links, {"rel": "next", "uri": uri}]}


@dataclass(frozen=True)
class Seen:
    district: str | None  # None: a token the server does not know
    query: dict[str, str]
    at: float  # time.time() when the request arrived
    status: int
    reset: int | None = None  # the X-RateLimit-Reset sent, for a 429
    path: str = EVENTS


def item_id(item: dict[str, Any]) -> str:
    event = item["data"] if "type" not in item else item
    return str(event["id"])


def clever_now() -> str:
    """Now, as Clever writes ``created`` and ``last_modified``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class _Collection:
    """Users or sections of one district: each item's JSON bytes by id, served in id order.
    Encoded once, when put: a page of 10,000 is a join of bytes, not 10,000 objects serialised
    again for every request."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._items: dict[str, bytes] = {}
        self._order: list[str] | None = None
        self._by_role: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._items

    def put(self, obj: dict[str, Any]) -> None:
        object_id = str(obj["id"])
        uri = f"{self.path}/{object_id}"
        self._items[object_id] = b'{"data":' + _encode(obj) + b',"uri":' + _encode(uri) + b"}"
        self._changed()

    def get(self, object_id: str) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self._items[object_id])["data"]
        return obj

    def remove(self, object_id: str) -> bool:
        gone = self._items.pop(object_id, None) is not None
        if gone:
            self._changed()
        return gone

    def _changed(self) -> None:
        # A put that only replaces an item keeps the order; it is cheap to rebuild anyway.
        self._order = None
        self._by_role.clear()

    def ids(self, role: str | None = None) -> list[str]:
        if self._order is None:
            self._order = sorted(self._items)
        if role is None:
            return self._order
        if role not in self._by_role:
            self._by_role[role] = [i for i in self._order if role in self.get(i).get("roles", {})]
        return self._by_role[role]

    def join(self, ids: list[str]) -> bytes:
        return b"[" + b",".join(self._items[i] for i in ids) + b"]"

    def footprint(self) -> int:
        """Bytes this collection holds (items, ids, the dict and the order)."""
        held = sys.getsizeof(self._items) + sys.getsizeof(self._order or [])
        return held + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in self._items.items())


@dataclass
class _Roster:
    district: dict[str, Any]
    users: _Collection = field(default_factory=lambda: _Collection(USERS))
    sections: _Collection = field(default_factory=lambda: _Collection(SECTIONS))


class FakeClever:
    def __init__(
        self,
        *,
        wrap: bool = True,
        max_page: int = 1000,
        data_max_page: int = DATA_MAX_PAGE,
        range_cursors: bool = False,
    ) -> None:
        self.wrap = wrap
        self.max_page = max_page  # the events' largest page: a larger limit is served this many
        self.data_max_page = data_max_page  # the Data API's: a larger limit is a 413
        # True: a data cursor is a bound (ids after it), so one naming a removed item still works.
        self.range_cursors = range_cursors
        self._tokens: dict[str, str] = {}
        self._feeds: dict[str, list[dict[str, Any]]] = {}
        self._expired: dict[str, int] = {}
        self._rosters: dict[str, _Roster] = {}
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

    # the events feed -----------------------------------------------------------------------

    def district(self, district_id: str, token: str) -> None:
        """Let ``token`` read ``district_id``: an empty feed and, until ``roster``, no users."""
        with self._lock:
            self._tokens[token] = district_id
            self._feeds.setdefault(district_id, [])
            self._expired.setdefault(district_id, 0)
            self._rosters.setdefault(district_id, _Roster({"id": district_id}))

    def add(self, district_id: str, *events: dict[str, Any]) -> None:
        """Append events to the district's feed, served wrapped or bare as configured."""
        wrapped = ({"data": e, "uri": f"{EVENTS}/{e['id']}"} if self.wrap else e for e in events)
        self.add_items(district_id, *wrapped)

    def add_items(self, district_id: str, *items: dict[str, Any]) -> None:
        """Append list items exactly as they are to be served."""
        with self._lock:
            self._feeds[district_id].extend(items)

    def expire(self, district_id: str, count: int) -> None:
        """The oldest ``count`` events leave the 30-day window: a cursor on them is unknown."""
        with self._lock:
            self._expired[district_id] += count

    def ids(self, district_id: str) -> list[str]:
        with self._lock:
            return [item_id(i) for i in self._feeds[district_id]]

    # the district's data -------------------------------------------------------------------

    def roster(self, district_id: str, token: str, snapshot: dict[str, Any]) -> None:
        """Serve the district of a roster snapshot (SPEC §5.1) to ``token``, replacing what it
        served before: its record, and its users and sections (those naming another district are
        left out). ``platform`` and the district's ``policy`` are ours, not Clever's: left out."""
        record = next((d for d in snapshot.get("districts", []) if d["id"] == district_id), None)
        if record is None:
            raise KeyError(f"the snapshot has no district {district_id}")
        roster = _Roster({k: v for k, v in record.items() if k != "policy"})
        for user in snapshot.get("users", []):
            if user.get("district", district_id) == district_id:
                roster.users.put(user)
        for section in snapshot.get("sections", []):
            if section.get("district", district_id) == district_id:
                roster.sections.put(section)
        self.district(district_id, token)
        with self._lock:
            self._rosters[district_id] = roster

    def update_district(self, district_id: str, **fields: Any) -> None:
        with self._lock:
            self._rosters[district_id].district.update(fields)

    def put_users(self, district_id: str, *users: dict[str, Any]) -> None:
        """Add users, or replace them whole by id."""
        with self._lock:
            for user in users:
                self._rosters[district_id].users.put(user)

    def update_user(
        self, district_id: str, user_id: str, *, touch: bool = True, **fields: Any
    ) -> dict[str, Any]:
        """Replace top-level fields of a user (``roles=…``, ``name=…``); ``last_modified`` moves
        to now unless ``touch=False``. The user as now served."""
        return self._update(self._rosters_of(district_id).users, user_id, touch, fields)

    def drop_role(self, district_id: str, user_id: str, role: str) -> dict[str, Any]:
        """The user loses one Clever role (``district_admin``, ``teacher``, …), keeps the rest."""
        with self._lock:
            roles = dict(self._rosters[district_id].users.get(user_id).get("roles", {}))
        roles.pop(role)
        return self.update_user(district_id, user_id, roles=roles)

    def remove_users(self, district_id: str, *user_ids: str, from_sections: bool = True) -> int:
        """Users leave Clever's roster; how many there were. ``from_sections``: and every section
        that listed them no longer does (as Clever serves it: a deleted user is in no section)."""
        gone = set(user_ids)
        with self._lock:
            roster = self._rosters[district_id]
            removed = sum(roster.users.remove(u) for u in gone)
            if from_sections:
                for section_id in list(roster.sections.ids()):
                    section = roster.sections.get(section_id)
                    members = {*section.get("students", []), *section.get("teachers", [])}
                    if section.get("teacher") in gone or members & gone:
                        roster.sections.put(_without(section, gone, gone))
        return removed

    def put_sections(self, district_id: str, *sections: dict[str, Any]) -> None:
        """Add sections, or replace them whole by id."""
        with self._lock:
            for section in sections:
                self._rosters[district_id].sections.put(section)

    def update_section(
        self, district_id: str, section_id: str, *, touch: bool = True, **fields: Any
    ) -> dict[str, Any]:
        return self._update(self._rosters_of(district_id).sections, section_id, touch, fields)

    def shrink_section(
        self,
        district_id: str,
        section_id: str,
        *,
        students: Iterable[str] = (),
        teachers: Iterable[str] = (),
        touch: bool = True,
    ) -> dict[str, Any]:
        """These students and teachers leave the section (still in the district's roster)."""
        with self._lock:
            collection = self._rosters[district_id].sections
            section = _without(collection.get(section_id), set(students), set(teachers))
            if touch:
                section["last_modified"] = clever_now()
            collection.put(section)
            return section

    def remove_sections(self, district_id: str, *section_ids: str) -> int:
        with self._lock:
            sections = self._rosters[district_id].sections
            return sum(sections.remove(s) for s in set(section_ids))

    def users(self, district_id: str) -> list[dict[str, Any]]:
        """The district's users as served, in order."""
        with self._lock:
            users = self._rosters[district_id].users
            return [users.get(i) for i in users.ids()]

    def sections(self, district_id: str) -> list[dict[str, Any]]:
        with self._lock:
            sections = self._rosters[district_id].sections
            return [sections.get(i) for i in sections.ids()]

    def user_ids(self, district_id: str, role: str | None = None) -> list[str]:
        with self._lock:
            return list(self._rosters[district_id].users.ids(role))

    def section_ids(self, district_id: str) -> list[str]:
        with self._lock:
            return list(self._rosters[district_id].sections.ids())

    def footprint(self, district_id: str) -> int:
        """Bytes the server holds for the district's users and sections."""
        with self._lock:
            roster = self._rosters[district_id]
            return roster.users.footprint() + roster.sections.footprint()

    def _rosters_of(self, district_id: str) -> _Roster:
        with self._lock:
            return self._rosters[district_id]

    def _update(
        self, collection: _Collection, object_id: str, touch: bool, fields: dict[str, Any]
    ) -> dict[str, Any]:
        with self._lock:
            obj = {**collection.get(object_id), **fields}
            if touch:
                obj["last_modified"] = clever_now()
            collection.put(obj)
            return obj

    # scripting and reading back ------------------------------------------------------------

    def script(self, district_id: str, *responses: Scripted) -> None:
        with self._lock:
            self._scripts.setdefault(district_id, []).extend(responses)
            self._stalls.extend(r.stall for r in responses if r.stall is not None)

    def requests(self, district_id: str | None, path: str | None = None) -> list[Seen]:
        """What the server received for the district (None: with an unknown token), oldest
        first; only for ``path`` if given."""
        with self._lock:
            return [
                s
                for s in self._seen
                if s.district == district_id and (path is None or s.path == path)
            ]

    # serving -------------------------------------------------------------------------------

    def _take_script(self, district_id: str, path: str, query: dict[str, str]) -> Scripted | None:
        queue = self._scripts.get(district_id, [])
        for n, scripted in enumerate(queue):
            if scripted.path not in (None, path):
                continue
            if scripted.after is None or scripted.after == query.get("starting_after"):
                return queue.pop(n)
        return None

    def respond(self, target: str, authorization: str) -> tuple[Scripted, bytes]:
        """What to answer: the scripted response (or a plain one, with the real status) and the
        body's bytes."""
        url = urlsplit(target)
        path, query = url.path, dict(parse_qsl(url.query))
        token = authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else ""
        with self._lock:
            district = self._tokens.get(token)
            scripted = None
            if not _served(path):
                scripted, payload = Scripted(404), _encode({"error": "not found"})
            elif district is None:
                scripted, payload = Scripted(401), _encode({"error": "invalid token"})
            else:
                scripted = self._take_script(district, path, query)
                if scripted is not None and scripted.raw is not None:
                    payload = scripted.raw
                elif scripted is not None and scripted.status != 200:
                    payload = _encode(scripted.body or {"error": f"scripted {scripted.status}"})
                elif scripted is not None and scripted.body is not None:
                    payload = json.dumps(scripted.body).encode()  # NaN stays NaN: a fault
                else:
                    status, payload = self._serve(district, path, query)
                    if scripted is not None and scripted.edit is not None and status == 200:
                        payload = json.dumps(scripted.edit(json.loads(payload))).encode()
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
            self._seen.append(Seen(district, query, time.time(), scripted.status, reset, path))
        return scripted, payload

    def _serve(self, district: str, path: str, query: dict[str, str]) -> tuple[int, bytes]:
        if path == EVENTS:
            status, body = self._page(district, query)
            return status, json.dumps(body).encode()
        roster = self._rosters[district]
        if path.startswith(DISTRICTS + "/"):
            if path != district_path(district):
                return 404, _encode({"message": "Resource not found"})
            return 200, _encode({"data": roster.district})
        return self._list(roster.users if path == USERS else roster.sections, query)

    def _list(self, items: _Collection, query: dict[str, str]) -> tuple[int, bytes]:
        """One page of users or sections, as Clever's Data API pages them."""
        try:
            # Unasked, Clever's default (or the cap, when a test set it lower).
            limit = int(query.get("limit", min(DATA_DEFAULT_PAGE, self.data_max_page)))
        except ValueError:
            return 400, _encode({"message": "limit must be an integer"})
        if limit < 1:
            return 400, _encode({"message": "limit must be positive"})
        if limit > self.data_max_page:
            return 413, _encode({"message": f"limit over {self.data_max_page}"})
        ids = items.ids(query.get("role") if items.path == USERS else None)
        if "ending_before" in query:
            end = self._cursor(ids, query["ending_before"], after=False)
            if end is None:
                return 404, _encode({"message": "Resource not found"})
            start = max(0, end - limit)
        elif "starting_after" in query:
            found = self._cursor(ids, query["starting_after"], after=True)
            if found is None:
                return 404, _encode({"message": "Resource not found"})
            start = found
            end = start + limit
        else:
            start, end = 0, limit
        chunk = ids[start:end]
        kept = {k: v for k, v in query.items() if k in ("limit", "role")}
        links = [{"rel": "self", "uri": f"{items.path}?{urlencode(query)}".rstrip("?")}]
        if chunk:
            for rel, cursor in (("next", "starting_after"), ("prev", "ending_before")):
                at = chunk[-1] if rel == "next" else chunk[0]
                links.append({"rel": rel, "uri": f"{items.path}?{urlencode({**kept, cursor: at})}"})
        return 200, b'{"data":' + items.join(chunk) + b',"links":' + _encode(links) + b"}"

    def _cursor(self, ids: list[str], cursor: str, *, after: bool) -> int | None:
        """Where a page starts (``after``) or ends: None for an id no item has (unless cursors
        are bounds, as with ``range_cursors``)."""
        at = bisect.bisect_left(ids, cursor)
        exact = at < len(ids) and ids[at] == cursor
        if not exact and not self.range_cursors:
            return None
        return at + 1 if after and exact else at

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


def _served(path: str) -> bool:
    if path in (EVENTS, USERS, SECTIONS):
        return True
    head, _, district_id = path.rpartition("/")
    return head == DISTRICTS and bool(district_id)


def _without(section: dict[str, Any], students: set[str], teachers: set[str]) -> dict[str, Any]:
    """A section without these students and teachers; its ``teacher`` is the first teacher left."""
    kept = [t for t in section.get("teachers", []) if t not in teachers]
    shrunk = {
        **section,
        "students": [s for s in section.get("students", []) if s not in students],
        "teachers": kept,
    }
    if section.get("teacher") in teachers:
        shrunk["teacher"] = kept[0] if kept else None
    return shrunk


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeClever


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle's algorithm can hold a page's
    # last segment until the client's delayed ACK (40 ms a page).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        scripted, payload = self.server.fake.respond(
            self.path, self.headers.get("Authorization", "")
        )
        if scripted.delay:
            time.sleep(scripted.delay)  # the slow server under test, not a test waiting
        try:
            self.send_response(scripted.status)
            if not any(name.lower() == "content-type" for name in scripted.headers):
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
