"""Celery tasks: thin adapters over the plain units of work.

Each task passes ids, re-reads its row, counts the attempt in SQL before working (so a task that
kills its worker every time is still capped), retries transient failures in two layers (tenacity
in-process, then Celery with exponential backoff and jitter), and dead-letters the rest.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from celery import Task
from celery.utils.time import get_exponential_backoff_interval
from kombu.exceptions import BatchPublishError  # type: ignore[attr-defined]  # kombu 5.7; stubs lag
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from models import DeadLetter, ExitUnit, RosterEvent, utcnow
from tasks import conversion, events, exits
from tasks.errors import InvariantViolation, WaitForRoster
from tasks.sql import AsyncCommit, chunks, in_ids
from worker.celery_app import app
from worker.db import autocommit, get_engine, session_scope
from worker.logs import bound
from worker.settings import get_settings

log = logging.getLogger("grassroots.tasks")
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Failure classification


def is_transient(exc: BaseException) -> bool:
    """Worth trying again: the database or broker was unreachable, a lock wait timed out, a
    deadlock was broken. Anything else (a missing row, bad data, an invariant) is permanent."""
    if isinstance(
        exc, OperationalError | BrokerError | RedisConnectionError | ConnectionError | WaitForRoster
    ):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


SHORT_TRIES = 3


def _short_retries(fn: Callable[[], T], tries: int = SHORT_TRIES) -> T:
    """Tenacity around one unit of work: rides out a brief blip without a Celery round trip."""
    for attempt in Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(tries),
        wait=wait_random_exponential(multiplier=0.05, max=1),
        reraise=True,
    ):
        with attempt:
            return fn()
    raise AssertionError("unreachable")  # pragma: no cover


def _limits() -> events.Limits:
    s = get_settings()
    return events.Limits(retention_days=s.retention_days, brake_percent=s.removal_brake_percent)


def _dead_letter(
    *,
    task: str,
    args: dict[str, Any],
    event_id: str | None,
    exc: BaseException,
    reason: str,
    attempts: int,
) -> None:
    """Keep the failure in SQL with all it takes to replay it. A replay that fails again lands
    on the same dead letter, its count raised. Written with the short retries: a row lock held
    a moment by another copy of the task must not lose the record of the failure."""
    now = utcnow()
    tb = "".join(traceback.format_exception(exc))[-20000:]

    def write() -> None:
        with session_scope() as session:
            letter = None
            if event_id is not None:
                letter = session.scalar(
                    select(DeadLetter)
                    .where(DeadLetter.event_id == event_id)
                    .order_by(DeadLetter.id.desc())
                    .limit(1)
                    .with_for_update()
                )
            if letter is None:
                session.add(
                    DeadLetter(
                        event_id=event_id,
                        task=task,
                        args=args,
                        reason=reason,
                        error=str(exc)[:5000],
                        traceback=tb,
                        attempts=attempts,
                        first_failed_at=now,
                        last_failed_at=now,
                    )
                )
            else:
                letter.attempts += attempts
                letter.reason, letter.error, letter.traceback = reason, str(exc)[:5000], tb
                letter.last_failed_at, letter.resolved_at = now, None
            if event_id is not None:
                session.execute(
                    update(RosterEvent)
                    .where(RosterEvent.id == event_id)
                    .values(status="dead", error=f"{reason}: {str(exc)[:500]}", updated_at=now)
                )
            if task == "grassroots.exit_unit":
                session.execute(
                    update(ExitUnit)
                    .where(ExitUnit.exit_id == args["exit_id"], ExitUnit.key == args["key"])
                    .values(status="dead")
                )

    _short_retries(write)
    log.error("dead-lettered %s %s: %s", task, args, reason)


@dataclass(frozen=True)
class FirstTry(Generic[T]):
    """An attempt counted and the work's first try made at once."""

    attempts: int | None  # None: nothing to do (done, held, dead or gone)
    result: T | None = None  # None: the work did not start (past the most attempts allowed)
    error: Exception | None = None  # the first try's failure, after the count committed


def _guarded(
    task: Task[Any, Any],
    *,
    name: str,
    args: dict[str, Any],
    event_id: str | None,
    attempt: Callable[[Connection], int | None],
    work: Callable[[], T],
    first: Callable[[int], FirstTry[T]] | None = None,
) -> T | None:
    """Count the attempt (committed before the work starts), run the work, and retry or
    dead-letter its failure.

    ``first``, if given, counts the attempt and makes the work's first try in one go, given the
    most attempts allowed (the work must not start beyond them). If it fails without telling the
    count, the attempt is counted again the usual way."""
    settings = get_settings()
    most = settings.task_max_retries + 1

    def count() -> int | None:
        # The counters commit without the WAL wait (``AsyncCommit``): an increment lost in a
        # crash of Postgres itself only allows one more attempt.
        with autocommit() as conn:
            return attempt(conn)

    tried = None
    if first is not None:
        try:
            tried = first(most)
        except Exception as exc:
            log.warning("%s %s: counting it again after %s", name, args, type(exc).__name__)
    attempts = _short_retries(count) if tried is None else tried.attempts
    if attempts is None:
        return None  # already done, held, dead or gone: a redelivery has nothing to do
    if attempts > most:
        _dead_letter(
            task=name,
            args=args,
            event_id=event_id,
            attempts=attempts,
            reason="too_many_attempts",
            exc=RuntimeError(f"started {attempts - 1} times without finishing"),
        )
        return None
    try:
        if tried is None:
            return _short_retries(work)
        if tried.error is None:
            return tried.result
        if not is_transient(tried.error):
            raise tried.error
        return _short_retries(work, SHORT_TRIES - 1)  # the first try was one of them
    except Exception as exc:
        if is_transient(exc) and task.request.retries < settings.task_max_retries:
            countdown = get_exponential_backoff_interval(
                factor=1,
                retries=task.request.retries,
                maximum=settings.retry_backoff_max,
                full_jitter=True,
            )
            log.warning("retrying %s %s in %ss: %s", name, args, countdown, type(exc).__name__)
            raise task.retry(exc=exc, countdown=countdown) from exc
        reason = (
            InvariantViolation.reason
            if isinstance(exc, InvariantViolation)
            else "retries_exhausted"
            if is_transient(exc)
            else "error"
        )
        _dead_letter(
            task=name, args=args, event_id=event_id, exc=exc, reason=reason, attempts=attempts
        )
        return None


# --------------------------------------------------------------------------------------------
# Events


def _bump_event(event_id: str) -> Callable[[Connection], int | None]:
    def bump(conn: Connection) -> int | None:
        attempts: int | None = conn.scalar(
            update(RosterEvent)
            .where(RosterEvent.id == event_id, RosterEvent.status.in_(("accepted", "processing")))
            .values(attempts=RosterEvent.attempts + 1, status="processing", updated_at=utcnow())
            .returning(RosterEvent.attempts, AsyncCommit())
        )
        return attempts

    return bump


@app.task(name="grassroots.process_event", bind=True)
def process_event(self: Task[Any, Any], event_id: str) -> str | None:
    def work() -> events.Routed | None:
        with session_scope() as session:
            return events.process_event(session, event_id, _limits())

    with bound(event_id=event_id):
        routed = _guarded(
            self,
            name="grassroots.process_event",
            args={"event_id": event_id},
            event_id=event_id,
            attempt=_bump_event(event_id),
            work=work,
        )
    if routed is None:
        return None
    if routed.exit_id is not None:
        dispatch_exit(routed.exit_id)
    return routed.status


def enqueue_events(event_ids: Iterable[str]) -> int:
    """Send events to the workers, after their inbox rows are committed. Returns how many were
    sent; a broker outage is logged, not raised: the relay sends them once it is back.

    All of them go over one connection in pipelined round trips (kombu's ``Producer.batch``:
    Celery still builds and routes each message; only the final Redis writes are buffered).
    A pipeline that fails may have delivered part of its messages; they count as unsent, and a
    second copy sent by the relay is harmless (``process_event`` re-reads its row).
    """
    ids = list(event_ids)
    if not ids:
        return 0
    try:
        with app.producer_or_acquire() as producer, producer.batch():
            for event_id in ids:
                process_event.apply_async((event_id,), producer=producer)
    except (BrokerError, BatchPublishError, RedisConnectionError, OSError) as exc:
        log.warning(
            "broker unavailable, %d event(s) left for the relay: %s", len(ids), type(exc).__name__
        )
        return 0
    return len(ids)


# --------------------------------------------------------------------------------------------
# District exits


@app.task(name="grassroots.district_exit", bind=True)
def district_exit(self: Task[Any, Any], district_id: str, trigger: str = "ops") -> int | None:
    def work() -> int:
        with session_scope() as session:
            plan = exits.start_exit(
                session, district_id, trigger=trigger, batch_size=get_settings().exit_batch_size
            )
            return plan.exit_id

    exit_id = _guarded(
        self,
        name="grassroots.district_exit",
        args={"district_id": district_id, "trigger": trigger},
        event_id=None,
        attempt=lambda conn: 1,
        work=work,
    )
    if exit_id is not None:
        dispatch_exit(exit_id)
    return exit_id


DISPATCH_CHUNK = 250


def dispatch_exit(exit_id: int) -> None:
    """Send the exit's pending units of its current phase (teachers, then account batches): all
    of them the first time, what is missing after a crash. Units are idempotent, so sending one
    twice does no harm."""
    with session_scope() as session:
        pending = exits.pending_units(session, exit_id)
        session.execute(
            update(ExitUnit)
            .where(ExitUnit.exit_id == exit_id, in_ids(ExitUnit.key, [k for k, _ in pending]))
            .values(dispatched_at=utcnow())
        )
    if not pending:
        finish_exit.apply_async((exit_id,))
        return
    # Pipelined a few hundred at a time: the first units start while the rest are being sent.
    with app.producer_or_acquire() as producer:
        for chunk in chunks(pending, DISPATCH_CHUNK):
            with producer.batch():
                for key, kind in chunk:
                    exit_unit.apply_async(
                        (exit_id, key),
                        producer=producer,
                        queue="fanout" if kind == "teacher" else "conversions",
                    )


def _bump_unit(exit_id: int, key: str) -> Callable[[Connection], int | None]:
    def bump(conn: Connection) -> int | None:
        attempts: int | None = conn.scalar(
            exits.BUMP_ATTEMPTS, {"unit_exit": exit_id, "unit_key": key}
        )
        return attempts

    return bump


@app.task(name="grassroots.exit_unit", bind=True)
def exit_unit(self: Task[Any, Any], exit_id: int, key: str) -> bool | None:
    def work() -> exits.UnitResult:
        # An exit unit commits without waiting for the WAL flush (``tasks.sql.AsyncCommit``), and
        # on Postgres a teacher unit is a single statement, run in autocommit.
        # (LOCK_TIMEOUT_MS is set on every connection: see ``worker.db.postgres_options``.)
        if alone:
            with autocommit() as conn:
                return exits.run_teacher_unit(conn, exit_id, key)
        with session_scope() as session:
            return exits.run_unit(session, exit_id, key, trigger=f"exit:{exit_id}")

    def first(most: int) -> FirstTry[exits.UnitResult]:
        # Thousands of these per district: the count and the unit share one round trip.
        with autocommit() as conn:
            try:
                attempts, result = exits.count_and_run_teacher_unit(
                    conn, exit_id, key, max_attempts=most
                )
            except exits.TeacherUnitFailed as failed:
                return FirstTry(failed.attempts, error=failed.error)
        return FirstTry(attempts, result)

    alone = exits.runs_alone(get_engine().dialect, key)
    result = _guarded(
        self,
        name="grassroots.exit_unit",
        args={"exit_id": exit_id, "key": key},
        event_id=None,
        attempt=_bump_unit(exit_id, key),
        work=work,
        first=first if alone else None,
    )
    if result is not None and result.exit_complete:
        finish_exit.apply_async((exit_id,))
    elif result is not None and result.teachers_complete:
        dispatch_exit(exit_id)
    return None if result is None else result.ran


@app.task(name="grassroots.finish_exit", bind=True)
def finish_exit(self: Task[Any, Any], exit_id: int) -> bool | None:
    def work() -> bool:
        with session_scope() as session:
            return exits.finish(session, exit_id, trigger=f"exit:{exit_id}") is not None

    return _guarded(
        self,
        name="grassroots.finish_exit",
        args={"exit_id": exit_id},
        event_id=None,
        attempt=lambda conn: 1,
        work=work,
    )


# --------------------------------------------------------------------------------------------
# Maintenance


@app.task(name="grassroots.purge")
def purge() -> int:
    with session_scope() as session:
        return conversion.purge(session, retention_days=get_settings().retention_days)


TASK_NAMES = (
    "grassroots.process_event",
    "grassroots.district_exit",
    "grassroots.exit_unit",
    "grassroots.finish_exit",
    "grassroots.purge",
    "grassroots.poll",
)
