"""The receiver's way into the database, and group commit for webhooks (SPEC §5.2).

Each webhook request does its cheap checks on the event loop and hands its inbox row to the
process's :class:`InboxWriter`. The writer stores everything queued in one transaction: one
multi-row ``INSERT … ON CONFLICT DO NOTHING RETURNING`` and one commit for many requests, so
the commit's disk flush is paid once per batch instead of once per event. Requests are answered
when their batch has committed. The events new to the inbox are then sent to the workers in one
pipelined broker round trip; if the broker is away they stay ``accepted`` in the inbox and the
relay (a loop in ``grassroots beat``) sends them later, so nothing answered 202 is lost.

Only one batch is written at a time: while one commits, the next one fills up. Under light load
a batch is a single event and waits for nothing; under heavy load batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from models import EventStatus
from tasks.inbox import Ingested, store
from worker.db import session_scope
from worker.dispatch import enqueue_events

log = logging.getLogger("grassroots.api")
T = TypeVar("T")
# Per transaction: enough rows that a burst is absorbed in a few commits; few enough bytes that
# one statement stays small even when events near the 1 MiB limit arrive together.
MAX_BATCH = 500
MAX_BATCH_BYTES = 8 * 1024 * 1024


class DatabaseUnavailable(Exception):
    """The database could not be reached (or the connection broke): the request may be retried."""


def in_session(fn: Callable[[Session], T]) -> T:
    """Run ``fn`` in one transaction; an unreachable database is :class:`DatabaseUnavailable`."""
    try:
        with session_scope() as session:
            return fn(session)
    except (OperationalError, DBAPIError) as exc:
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            raise DatabaseUnavailable(type(exc.orig).__name__) from exc
        raise


def _store(rows: Sequence[dict[str, Any]]) -> list[Ingested]:
    return in_session(lambda session: store(session, rows))


def write_batch(rows: Sequence[dict[str, Any]]) -> list[Ingested | Exception]:
    """Store ``rows`` in one transaction. An outage fails the whole batch (nothing of it is
    stored). Any other failure is one row's problem (a value the database refuses): the rows are
    then written one per transaction, so only that row's request fails."""
    try:
        return list(_store(rows))
    except DatabaseUnavailable:
        raise
    except Exception as exc:
        if len(rows) == 1:
            raise
        log.warning(
            "a batch of %d events failed (%s); writing them one at a time",
            len(rows),
            type(exc).__name__,
        )
    outcomes: list[Ingested | Exception] = []
    for row in rows:
        try:
            outcomes.append(_store([row])[0])
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


@dataclass
class _Waiting:
    row: dict[str, Any]
    size: int
    answer: asyncio.Future[Ingested]


class InboxWriter:
    """Group commit for one event loop. ``batches`` and ``events`` count what was written (for
    tests and debugging); ``waiting`` is how many rows wait for the next batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, max_batch: int = MAX_BATCH) -> None:
        self.loop = loop
        self.max_batch = max_batch
        self.batches = 0
        self.events = 0
        self._queue: deque[_Waiting] = deque()
        self._to_send: list[str] = []
        self._writing: asyncio.Task[None] | None = None
        self._sending: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def store(self, row: dict[str, Any], *, size: int) -> Ingested:
        """Store one inbox row (of an event ``size`` bytes long) with whatever else is queued;
        return once it is committed. Raises :class:`DatabaseUnavailable` if its batch could not
        be committed."""
        answer: asyncio.Future[Ingested] = self.loop.create_future()
        self._queue.append(_Waiting(row, size, answer))
        if self._writing is None:
            self._writing = self.loop.create_task(self._write_all())
        return await answer

    async def drain(self) -> None:
        """Wait until everything queued is written and sent (at shutdown, and in tests)."""
        while self._writing is not None or self._sending is not None:
            await asyncio.gather(*(t for t in (self._writing, self._sending) if t is not None))

    def _next_batch(self) -> list[_Waiting]:
        batch = [self._queue.popleft()]
        size = batch[0].size
        while (
            self._queue
            and len(batch) < self.max_batch
            and size + self._queue[0].size <= MAX_BATCH_BYTES
        ):
            size += self._queue[0].size
            batch.append(self._queue.popleft())
        return batch

    async def _write_all(self) -> None:
        try:
            while self._queue:
                await self._write(self._next_batch())
        except BaseException:
            # Cancelled (the loop is going away): no request may wait forever for its answer.
            while self._queue:
                self._queue.popleft().answer.cancel()
            raise
        finally:
            # No await since the loop saw the queue empty: no row can be stranded in it.
            self._writing = None

    async def _write(self, batch: list[_Waiting]) -> None:
        try:
            outcomes = await run_in_threadpool(write_batch, [w.row for w in batch])
        except BaseException as exc:
            for waiting in batch:
                if waiting.answer.done():
                    continue
                if not isinstance(exc, Exception):
                    waiting.answer.cancel()
                else:
                    waiting.answer.set_exception(exc if len(batch) == 1 else _copy(exc))
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self.batches += 1
            self.events += len(batch)
        for waiting, outcome in zip(batch, outcomes, strict=True):
            # A request that went away still had its row stored; only its answer is dropped.
            if waiting.answer.done():
                continue
            if isinstance(outcome, Exception):
                waiting.answer.set_exception(outcome)
            else:
                waiting.answer.set_result(outcome)
        new = [o.event_id for o in outcomes if isinstance(o, Ingested) and _to_enqueue(o)]
        if new:
            self._to_send.extend(new)
            if self._sending is None:
                self._sending = self.loop.create_task(self._send_all())

    async def _send_all(self) -> None:
        try:
            while self._to_send:
                ids, self._to_send = self._to_send, []
                try:
                    # A broker outage is logged there, not raised: the relay sends them later.
                    await run_in_threadpool(enqueue_events, ids)
                except Exception:
                    log.exception("sending %d event(s) failed; left for the relay", len(ids))
        finally:
            self._sending = None


def _to_enqueue(outcome: Ingested) -> bool:
    """Only an event new to the inbox goes to the workers, and only one it could interpret."""
    return outcome.new and outcome.status == EventStatus.ACCEPTED


def _copy(exc: Exception) -> Exception:
    """Each waiting request raises its own exception object: one object raised in several
    tasks would collect all their tracebacks."""
    if isinstance(exc, DatabaseUnavailable):
        return DatabaseUnavailable(*exc.args)
    return RuntimeError(f"storing the batch failed: {type(exc).__name__}")


_current: InboxWriter | None = None


def writer() -> InboxWriter:
    """The writer of the running event loop (one per receiver process; tests run several loops
    one after another)."""
    global _current
    loop = asyncio.get_running_loop()
    if _current is None or _current.loop is not loop:
        _current = InboxWriter(loop)
    return _current


async def drain() -> None:
    """Finish the running loop's writes and sends, if it has a writer."""
    if _current is not None and _current.loop is asyncio.get_running_loop():
        await _current.drain()
