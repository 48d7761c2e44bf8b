"""What every Celery task needs, once: the base class that runs a task's work in a session scope,
counts its attempts in SQL, retries transient failures in two layers and dead-letters the rest,
with the task's ids bound to every log line.

A task declares only its own work (``worker.jobs``): its name, the ``Ledger`` its attempts are
counted in (``tasks.attempts``) and its body, which reads ``self.session`` and returns what it
did. What it must send once its work has committed it hands to ``after_commit``.
"""

from __future__ import annotations

import inspect
import logging
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import structlog
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from models import DeadLetterReason
from tasks import deadletters
from tasks.attempts import Ledger, MessageLedger
from tasks.errors import InvariantViolation, WaitForRoster
from worker.db import autocommit, session_scope
from worker.settings import get_settings

log = logging.getLogger("grassroots.tasks")
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Failure classification and the short retries


def is_transient(exc: BaseException) -> bool:
    """Worth trying again: the database or broker was unreachable, a lock wait timed out, a
    deadlock was broken. Anything else (a missing row, bad data, an invariant) is permanent."""
    if isinstance(
        exc,
        OperationalError | BrokerError | RedisConnectionError | ConnectionError | WaitForRoster,
    ):
        return True
    if isinstance(exc, IntegrityError) and _sqlstate(exc) in RACES:
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def is_stopped(exc: BaseException) -> bool:
    """The attempt outlived TASK_TIME_LIMIT's soft limit (a hung query or service). Not tried
    again in the same process (its hard limit is 30 s away): the attempt ends and the task is
    sent again, or dead-lettered as ``time_limit`` if it was the last."""
    return isinstance(exc, SoftTimeLimitExceeded)


# Integrity errors that another transaction's concurrent write can cause: a unique key inserted
# by both, a parent row deleted meanwhile. Tried again, the work sees the other's row.
RACES = frozenset({"23505", "23503"})  # unique_violation, foreign_key_violation
# Integrity errors only a value can cause: tried again, it fails the same way.
BAD_VALUES = frozenset({"23502", "23514"})  # not_null_violation, check_violation


def _sqlstate(exc: DBAPIError) -> str | None:
    code = getattr(exc.orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def is_bad_input(exc: BaseException) -> bool:
    """The work's input holds a value that cannot be used (the database refuses it, or it does
    not have the shape it must): no retry can fix it. An event is then rejected, not
    dead-lettered (SPEC §5.2: nothing an operator can fix by replaying it)."""
    if isinstance(exc, ValidationError | DataError | UnicodeEncodeError):
        return True
    if isinstance(exc, IntegrityError):
        return _sqlstate(exc) in BAD_VALUES
    # A value the driver could not even send (a lone surrogate UTF-8 cannot encode).
    return isinstance(exc, StatementError) and isinstance(exc.orig, UnicodeEncodeError)


SHORT_TRIES = 3


def short_retries(fn: Callable[[], T], tries: int = SHORT_TRIES) -> T:
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


# --------------------------------------------------------------------------------------------
# The base class


@dataclass(frozen=True)
class FirstTry:
    """An attempt counted and the work's first try made in one go (``GrassrootsTask.first_try``)."""

    attempts: int | None  # None: nothing to do (done, held, dead or gone)
    result: Any = None  # what the work returned (None if it did not start: past its attempts)
    error: Exception | None = None  # the first try's failure, after the count committed


_session: ContextVar[Session | None] = ContextVar("grassroots_task_session", default=None)
_after_commit: ContextVar[list[Callable[[], object]] | None] = ContextVar(
    "grassroots_after_commit", default=None
)


def after_commit(fn: Callable[..., object], *args: Any) -> None:
    """Call ``fn(*args)`` once the running task's work has committed (not if it fails): what it
    sends to the broker must find the rows it names. A failure there is logged, not raised: the
    work is done, and the relay sends what is missing."""
    pending = _after_commit.get()
    if pending is None:
        raise RuntimeError("after_commit outside a task")
    pending.append(lambda: fn(*args))


class GrassrootsTask(Task):  # type: ignore[type-arg]
    """Every grassroots task: set once as the app's ``task_cls``.

    Per call: the log context is cleared and the task's ids bound; the attempt is counted in SQL
    and committed before the work starts, and the task refuses to work past
    ``TASK_MAX_RETRIES + 1`` attempts (a task that kills its worker is capped too); the work runs
    in one session scope (``self.session``), retried briefly in-process on a transient failure,
    then by Celery with exponential backoff and jitter while the SQL count is under the cap; a
    permanent failure, or one that outlasts the retries, is a dead letter.
    """

    # TASK_MAX_RETRIES, applied to the attempts counted in SQL, is the only cap. Celery's own
    # (``max_retries``, 3 by default) counts only this message's retries, and past it ``retry``
    # re-raises: the message would be acknowledged as failed with its work left unfinished.
    max_retries = None
    # Where its attempts are counted; None: on its own message (``tasks.attempts.MessageLedger``).
    ledger: ClassVar[Callable[..., Ledger] | None] = None
    # False: the work opens its own transactions (a poll commits page by page).
    session_scoped: ClassVar[bool] = True

    @property
    def session(self) -> Session:
        session = _session.get()
        if session is None:
            raise RuntimeError(f"{self.name} has no session: it is not session-scoped")
        return session

    def first_try(self, most: int, *args: Any, **kwargs: Any) -> FirstTry | None:
        """Count the attempt and make the work's first try in one go, given the most attempts
        allowed (the work must not start beyond them); None to count the usual way."""
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ledger = self._ledger(args, kwargs)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            task=self.name, task_id=self.request.id, **ledger.log_ids()
        )
        token = _after_commit.set([])
        try:
            return self._attempt(ledger, args, kwargs)
        finally:
            _after_commit.reset(token)
            structlog.contextvars.clear_contextvars()

    def _attempt(self, ledger: Ledger, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        settings = get_settings()
        most = settings.task_max_retries + 1
        tried = None
        try:
            tried = self.first_try(most, *args, **kwargs)
        except Exception as exc:
            log.warning("%s: counting it again after %s", self.name, type(exc).__name__)
        try:
            attempts = (
                tried.attempts
                if tried is not None
                else short_retries(_bump(ledger, self.request.id))
            )
        except Exception as exc:
            # The count cannot be written (the database is away longer than the short retries):
            # nothing was attempted, so nothing is counted against the cap. Sent again until the
            # database answers, or the message would be acknowledged with its work undone.
            self._send_again(exc, None)
            raise
        if attempts is None:
            return None  # already done, held, dead or gone: a redelivery has nothing to do
        if attempts > most:
            # Each ended with its process: killed, or stopped at the hard time limit.
            error = RuntimeError(
                f"started {attempts - 1} times without finishing (its process ended each time:"
                " killed, or stopped at TASK_TIME_LIMIT)"
            )
            self._dead_letter(
                ledger, args, kwargs, error, DeadLetterReason.TOO_MANY_ATTEMPTS, attempts
            )
            return None
        try:
            if tried is None:
                return short_retries(lambda: self._work(args, kwargs))
            if tried.error is None:
                self._send_after_commit()
                return tried.result
            if not is_transient(tried.error):
                raise tried.error
            return short_retries(lambda: self._work(args, kwargs), SHORT_TRIES - 1)
        except Exception as exc:
            self._send_again(exc, attempts)
            if is_bad_input(exc) and self._reject(ledger, exc):
                return None
            reason = (
                InvariantViolation.reason
                if isinstance(exc, InvariantViolation)
                else DeadLetterReason.TIME_LIMIT
                if is_stopped(exc)
                else DeadLetterReason.RETRIES_EXHAUSTED
                if is_transient(exc)
                else DeadLetterReason.ERROR
            )
            self._dead_letter(ledger, args, kwargs, exc, reason, attempts)
            return None

    def _send_again(self, exc: Exception, attempts: int | None) -> None:
        """Send a transient failure, or an attempt stopped by its soft time limit, again with
        exponential backoff and jitter, while attempts remain: ``attempts`` (counted in SQL;
        None if they could not be counted) below TASK_MAX_RETRIES + 1. Otherwise return: the
        caller dead-letters it."""
        if not (is_transient(exc) or is_stopped(exc)):
            return
        settings = get_settings()
        if attempts is not None and attempts > settings.task_max_retries:
            return
        countdown = get_exponential_backoff_interval(
            factor=1,
            retries=self.request.retries if attempts is None else attempts - 1,
            maximum=settings.retry_backoff_max,
            full_jitter=True,
        )
        log.warning("retrying %s in %ss: %s", self.name, countdown, type(exc).__name__)
        try:
            raise self.retry(exc=exc, countdown=countdown) from exc
        except Reject as refused:
            # The retry could not be sent (the broker is away): Celery would drop the message.
            # Put back instead, it is delivered again (and counted) once the broker takes it.
            raise Reject(refused.args[0] if refused.args else None, requeue=True) from exc

    def _work(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One try of the work, and what it hands to ``after_commit`` once it has committed."""
        pending = _after_commit.get()
        assert pending is not None
        pending.clear()  # what a failed try asked for is void
        if not self.session_scoped:
            result = self.run(*args, **kwargs)
        else:
            with self._session_scope():
                result = self.run(*args, **kwargs)
        self._send_after_commit()
        return result

    @contextmanager
    def _session_scope(self) -> Iterator[None]:
        with session_scope() as session:
            token = _session.set(session)
            try:
                yield
            except SoftTimeLimitExceeded:
                _abandon_statement(session)
                raise
            finally:
                _session.reset(token)

    def _send_after_commit(self) -> None:
        pending = _after_commit.get() or []
        for send in pending:
            try:
                send()
            except Exception as exc:
                log.warning(
                    "%s: sending after its commit failed (%s); the relay sends it later",
                    self.name,
                    type(exc).__name__,
                )
        pending.clear()

    def _dead_letter(
        self,
        ledger: Ledger,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        exc: BaseException,
        reason: str,
        attempts: int,
    ) -> None:
        """Written with the short retries: a row lock held a moment by another copy of the task
        must not lose the record of the failure."""
        arguments = self._arguments(args, kwargs)
        host = socket.gethostname()

        def write() -> bool:
            with session_scope() as session:
                return deadletters.record(
                    session,
                    task=self.name,
                    args=arguments,
                    ledger=ledger,
                    exc=exc,
                    reason=reason,
                    attempts=attempts,
                    host=host,
                )

        exception, _ = deadletters.describe(exc)
        if short_retries(write):
            log.error("dead-lettered %s: %s (%s)", self.name, reason, exception)
        else:
            # A late copy failed after another finished the work: that work stands.
            log.warning("%s failed (%s) after its work was done; left as done", self.name, reason)

    def _reject(self, ledger: Ledger, exc: BaseException) -> bool:
        """Reject the work's event for a value it holds; False if it has no event to reject (or
        the event finished meanwhile): the failure is then a dead letter."""
        exception, message = deadletters.describe(exc)
        reason = f"a value cannot be used: {exception}: {message}"[:500]

        def write() -> bool:
            with session_scope() as session:
                return ledger.reject(session, reason)

        if not short_retries(write):
            return False
        log.error("rejected the event of %s: %s", self.name, exception)
        return True

    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        return dict(inspect.signature(self.run).bind(*args, **kwargs).arguments)

    def _ledger(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Ledger:
        if self.ledger is not None:
            return self.ledger(*args, **kwargs)
        # Called in-process (no message): its attempts are this call's own.
        task_id = self.request.id or uuid.uuid4().hex
        ids = {
            name: value
            for name, value in self._arguments(args, kwargs).items()
            if isinstance(value, str | int) and not isinstance(value, bool)
        }
        return MessageLedger(self.name, task_id, ids)


def _abandon_statement(session: Session) -> None:
    """The soft time limit interrupted the session's statement while the server still runs it
    (a lock wait, a long query): cancel it there, so it gives up its place in the lock queue,
    and drop the connection, which still waits for that statement's answer (the rollback that
    follows then has nothing to send)."""
    if not session.in_transaction():
        return
    connection = session.connection()
    dbapi = connection.connection.dbapi_connection
    cancel = getattr(dbapi, "cancel_safe", None)  # psycopg's; SQLite runs nothing apart
    if cancel is not None:
        try:
            cancel(timeout=5)
        except Exception as exc:
            log.warning("cancelling a stopped statement failed: %s", type(exc).__name__)
    connection.invalidate()


def _bump(ledger: Ledger, task_id: str | None) -> Callable[[], int | None]:
    def bump() -> int | None:
        # The counters commit on their own, without the WAL wait (see ``tasks.attempts``).
        with autocommit() as conn:
            return ledger.bump(conn, task_id)

    return bump
