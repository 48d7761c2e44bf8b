"""What a listener does against a hostile client (``grassroots serve``): uvicorn's HTTP protocol
(httptools) with the limits it lacks.

uvicorn itself only closes a connection idle *between* requests (``timeout_keep_alive``); a
connection that never sends a request, or sends its head a byte at a time, is kept forever, and
httptools buffers a head of any size. Its ``limit_concurrency`` answers 503 once a request is
read, and holds the connection anyway. So, per connection, ``GuardedProtocol`` adds:

- a deadline for a request's head (``HEAD_TIMEOUT`` from the connection's opening, or from the
  first byte of a later request): past it, closed (408 if part of a head came);
- a cap on a head's size (``MAX_HEAD_BYTES``): past it, 431 and closed, before the rest is read;
- a deadline for a request's body (``BODY_TIMEOUT`` from its head): past it, 408 and closed;
- a cap on a listener's connections (``connection_cap``): at the cap a new connection first
  closes an idle kept-alive one, else the one that has waited longest for its head (a slow
  client's, never one whose request is being answered); only with neither is the new one
  refused (503).

Each cut is counted, by reason (``Cut``), in ``/metrics`` and in a throttled log line
(``worker.throttled_counts``), as is an upload the client aborted (``worker.api``): a flood is
one line a minute, never a line or a traceback per connection.
"""

from __future__ import annotations

import resource
import time
from enum import StrEnum
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from worker.throttled_counts import Tally

HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
# Clever's signed headers, an operator's cookie and token are well under 1 KiB; nginx's default
# is 4 × 8 KiB.
MAX_HEAD_BYTES = 32 * 1024
MAX_CONNECTIONS = 1000
# Descriptors kept for what a serving process opens besides its clients (database and Redis
# pools, logs, the listeners themselves).
RESERVED_DESCRIPTORS = 128
# Seconds a refused connection is kept, its answer sent and its reading stopped, before it is
# closed.
LINGER = 1.0
# Longer than a client or load balancer keeps an idle connection (60 s is common), so the server
# never closes one just as a request is sent on it (a reset the sender sees as lost).
KEEP_ALIVE = 75


class Cut(StrEnum):
    """Why a connection was closed before its request was answered."""

    HEAD_TIMEOUT = "head_timeout"
    HEAD_TOO_LARGE = "head_too_large"
    BODY_TIMEOUT = "body_timeout"
    # Closed to make room under the connection cap (idle, or still waiting for its head).
    EVICTED = "evicted"
    # Refused at the cap, no connection being closable.
    OVER_CAPACITY = "over_capacity"
    # The client went away before its body was read (``worker.api``).
    ABORTED = "aborted"


class Cuts(Tally):
    key = "grassroots:http_connections_cut"
    reasons = tuple(Cut)

    def first_line(self, reason: str, detail: str) -> str:
        return (
            f"connection cut ({reason}); further cuts are counted in /metrics and logged at most"
            " once a minute per reason"
        )

    def later_line(self, count: int, reason: str, seconds: float, detail: str) -> str:
        return f"{count} connection(s) cut ({reason}) in the last {seconds:.0f} s"


# This process's.
CUTS = Cuts()


def connection_cap() -> int:
    """Connections per listener: ``MAX_CONNECTIONS``, or fewer if this process's descriptor
    limit would run out first with both of its listeners full (then nothing more could be
    accepted, nor a database connection made)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, (soft - RESERVED_DESCRIPTORS) // 2))


# The options of a listener's ``uvicorn.Config``: our protocol, and uvicorn's own idle limit.
UVICORN_LIMITS = {"http": f"{__name__}:GuardedProtocol", "timeout_keep_alive": KEEP_ALIVE}


_REFUSAL = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the deadlines and caps above."""

    cap = connection_cap()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._in_head = True
        self._head_bytes = 0
        self._waiting_since = time.monotonic()
        self._deadline: Any = None
        self._refused = False
        self._arm(HEAD_TIMEOUT, Cut.HEAD_TIMEOUT)
        if len(self.connections) > self.cap:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered already: whatever else comes is dropped
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._cut(Cut.HEAD_TOO_LARGE, 431)

    # The parser's callbacks. Once a connection is refused, what the parser still finds in the
    # data it was given is dropped.

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        if self._deadline is None:  # a later request on a kept-alive connection
            self._waiting_since = time.monotonic()
            self._arm(HEAD_TIMEOUT, Cut.HEAD_TIMEOUT)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        # A whole head that came in one read is measured here: the count in data_received
        # bounds only the memory of one still coming.
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            self._cut(Cut.HEAD_TOO_LARGE, 431)
            return
        self._in_head = False
        self._head_bytes = 0
        self._arm(BODY_TIMEOUT, Cut.BODY_TIMEOUT)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._in_head = True
        super().on_message_complete()

    # --- the deadlines ----------------------------------------------------------------------

    def _arm(self, seconds: float, reason: Cut) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, reason)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, reason: Cut) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        # A connection that never sent a byte gets no answer: nothing asked for one.
        started = self._head_bytes > 0 or not self._in_head
        self._cut(reason, 408 if started else None)

    def _cut(self, reason: Cut, status: int | None) -> None:
        if self._refused:
            return  # cut already
        self._refused = True
        CUTS.count(reason)
        self._disarm()
        # The request being answered, if any (a kept-alive connection's last one was answered).
        answering = (
            self.cycle if self.cycle is not None and not self.cycle.response_complete else None
        )
        if answering is not None:
            # Its app sees the client gone, and answers nothing more.
            answering.disconnected = True
            answering.message_event.set()
        if status is None or (answering is not None and answering.response_started):
            self.transport.close()
            return
        phrase = _REFUSAL[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, phrase, len(phrase), phrase)
        )
        # A lingering close: the answer, then the end of our side, reading no more; closed a
        # moment later. Closed at once with the client's request unread, the connection would be
        # reset, and the client could lose the answer before reading it.
        self.transport.write_eof()
        self.flow.pause_reading()
        # Again once the loop has run: a transport starts reading after ``connection_made``.
        self.loop.call_soon(self._stop_reading)
        self.loop.call_later(LINGER, self.transport.close)

    def _stop_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    # --- the connection cap -----------------------------------------------------------------

    def _idle(self) -> bool:
        return self.timeout_keep_alive_task is not None

    def _waiting_for_head(self) -> bool:
        """Nothing of its being answered: a head still coming (or not even started)."""
        return (
            self._in_head
            and (self.cycle is None or self.cycle.response_complete)
            and not self.transport.is_closing()
        )

    def _make_room(self) -> None:
        others = [c for c in self.connections if c is not self and isinstance(c, GuardedProtocol)]
        victim = next((c for c in others if c._idle()), None)
        if victim is None:
            waiting = [c for c in others if c._waiting_for_head()]
            victim = min(waiting, key=lambda c: c._waiting_since, default=None)
        if victim is None:
            self._cut(Cut.OVER_CAPACITY, 503)
            return
        CUTS.count(Cut.EVICTED)
        victim._disarm()
        victim.transport.close()
