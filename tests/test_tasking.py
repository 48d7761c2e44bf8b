"""The task base class (``worker.tasking.GrassrootsTask``): what every task gets without writing
it — session scope, the SQL attempt counter, retries, dead letters, log context — checked on
the real tasks, called in-process against a real database."""

from __future__ import annotations

import socket
from typing import Any

import psycopg
import pytest
import structlog
from celery.exceptions import Reject, SoftTimeLimitExceeded
from sqlalchemy import select, update
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from models import DeadLetter, OperatorRequest, RequestKind, RosterEvent, TaskAttempt, utcnow
from tasks import events, exits, operator_requests
from tasks.attempts import EventLedger, UnitLedger
from tasks.inbox import ingest
from tests.support.app_env import CLOSED_BROKER, Configure
from worker import jobs
from worker.celery_app import app
from worker.db import session_scope
from worker.names import TaskName
from worker.settings import get_settings
from worker.tasking import SHORT_TRIES, GrassrootsTask, after_commit, is_bad_input, is_transient

# An event the worker acts on, about a user nobody knows: it ends ``ignored``.
EVENT = {
    "id": "evt-1",
    "type": "users.deleted",
    "created": "2026-11-01T00:00:00Z",
    "data": {"object": {"id": "nobody"}},
}


@pytest.fixture
def inbox(configure: Configure, database_url: str) -> str:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, TASK_MAX_RETRIES="2")
    with session_scope() as session:
        ingest(session, EVENT, source="webhook")
    return str(EVENT["id"])


def event_row(event_id: str) -> tuple[str, int]:
    with session_scope() as session:
        status, attempts = session.execute(
            select(RosterEvent.status, RosterEvent.attempts).where(RosterEvent.id == event_id)
        ).one()
    return status, attempts


def test_every_task_is_a_grassroots_task_with_its_own_ledger() -> None:
    app.loader.import_default_modules()
    tasks = {name: app.tasks[name] for name in TaskName}
    assert all(isinstance(task, GrassrootsTask) for task in tasks.values())
    assert getattr(tasks[TaskName.PROCESS_EVENT], "ledger", None) is EventLedger
    assert getattr(tasks[TaskName.EXIT_UNIT], "ledger", None) is UnitLedger


def test_a_task_binds_its_ids_to_the_log_context_and_clears_them_after(
    inbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    real = events.process_event

    def spy(*args: Any, **kwargs: Any) -> Any:
        structlog.contextvars.bind_contextvars(account_id="left-over")
        seen.append(structlog.contextvars.get_contextvars())
        return real(*args, **kwargs)

    monkeypatch.setattr(events, "process_event", spy)
    structlog.contextvars.bind_contextvars(stale="from an earlier task")
    assert jobs.process_event(inbox) == "ignored"
    assert seen == [
        {
            "task": TaskName.PROCESS_EVENT,
            "task_id": None,
            "event_id": inbox,
            "account_id": "left-over",
        }
    ]
    assert structlog.contextvars.get_contextvars() == {}


def test_the_attempt_is_counted_in_sql_before_the_work_and_a_finished_event_is_left_alone(
    inbox: str,
) -> None:
    assert jobs.process_event(inbox) == "ignored"
    assert event_row(inbox) == ("ignored", 1)
    # A redelivered copy finds the event final: nothing counted, nothing done.
    assert jobs.process_event(inbox) is None
    assert event_row(inbox) == ("ignored", 1)


def test_a_task_started_too_often_is_dead_lettered_without_running(
    inbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    monkeypatch.setattr(events, "process_event", lambda *a, **k: ran.append("ran"))
    with session_scope() as session:
        session.get(RosterEvent, inbox).attempts = 3  # type: ignore[union-attr]
    # TASK_MAX_RETRIES=2 allows three attempts; this is the fourth.
    assert jobs.process_event(inbox) is None
    assert ran == []
    assert event_row(inbox) == ("dead", 4)
    with session_scope() as session:
        letter = session.scalars(select(DeadLetter)).one()
    assert (letter.reason, letter.task, letter.args) == (
        "too_many_attempts",
        TaskName.PROCESS_EVENT,
        {"event_id": inbox},
    )


def test_a_permanent_failure_is_dead_lettered_at_once_and_rolls_its_work_back(
    inbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[str] = []

    def fails(session: Any, event_id: str, limits: Any) -> None:
        session.get(RosterEvent, event_id).error = "half-done"
        after_commit(sent.append, "never")
        raise KeyError("a bug, not a blip")

    monkeypatch.setattr(events, "process_event", fails)
    assert jobs.process_event(inbox) is None
    assert event_row(inbox) == ("dead", 1)  # one try: a permanent error is not retried
    assert sent == []
    with session_scope() as session:
        letter = session.scalars(select(DeadLetter)).one()
        error = session.scalar(select(RosterEvent.error).where(RosterEvent.id == inbox))
    assert letter.reason == "error" and "KeyError" in (letter.traceback or "")
    assert error is not None and "half-done" not in error
    # Everything an operator needs to act on it, in the letter itself.
    assert (letter.task, letter.args, letter.subject) == (
        TaskName.PROCESS_EVENT,
        {"event_id": inbox},
        f"event:{inbox}",
    )
    assert (letter.exception, letter.error) == ("KeyError", "'a bug, not a blip'")
    assert letter.attempts == 1 and letter.host == socket.gethostname()
    assert letter.first_failed_at == letter.last_failed_at and letter.resolved_at is None


def test_a_value_the_database_refuses_rejects_the_event_at_once_without_a_dead_letter(
    inbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What slipped past the inbox's checks and failed in SQL on a value: no retry can fix it,
    and no operator replay either. The event is rejected, with the driver's message only."""

    def refused(session: Any, event_id: str, limits: Any) -> None:
        raise DataError(
            "SELECT ... WHERE id = %(id)s",
            {"id": "leo@example.org"},
            psycopg.errors.CharacterNotInRepertoire("invalid byte sequence for encoding"),
        )

    monkeypatch.setattr(events, "process_event", refused)
    assert jobs.process_event(inbox) is None
    assert event_row(inbox) == ("rejected", 1)
    with session_scope() as session:
        error = session.scalar(select(RosterEvent.error).where(RosterEvent.id == inbox))
        assert session.scalars(select(DeadLetter)).all() == []
    assert error == (
        "a value cannot be used: CharacterNotInRepertoire: invalid byte sequence for encoding"
    )


def test_a_unique_key_race_is_retried_and_a_bad_value_in_other_work_is_dead_lettered(
    inbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    race = IntegrityError("INSERT ...", {}, psycopg.errors.UniqueViolation("duplicate key"))
    bad = IntegrityError("INSERT ...", {}, psycopg.errors.CheckViolation("violates check"))
    assert is_transient(race) and not is_bad_input(race)
    assert is_bad_input(bad) and not is_transient(bad)

    # Work that is no event's cannot be rejected: it is dead-lettered at once, not retried.
    def finish(*args: Any, **kwargs: Any) -> None:
        raise bad

    monkeypatch.setattr(exits, "finish", finish)
    jobs.finish_exit.apply(args=(7,), task_id="msg-bad")
    with session_scope() as session:
        letter = session.scalars(select(DeadLetter)).one()
        counted = session.get(TaskAttempt, "msg-bad")
    assert (letter.reason, letter.exception, letter.attempts) == ("error", "CheckViolation", 1)
    assert counted is not None and counted.attempts == 1


def test_a_late_copy_that_fails_after_another_finished_the_work_leaves_it_finished(
    inbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def other_copy_finishes_then_this_one_fails(session: Any, event_id: str, limits: Any) -> None:
        # A relayed duplicate, taken by another worker, completes the event meanwhile.
        with session_scope() as other:
            other.get(RosterEvent, event_id).status = "done"  # type: ignore[union-attr]
        raise KeyError("this copy breaks")

    monkeypatch.setattr(events, "process_event", other_copy_finishes_then_this_one_fails)
    assert jobs.process_event(inbox) is None
    assert event_row(inbox) == ("done", 1)
    with session_scope() as session:
        assert session.scalars(select(DeadLetter)).all() == []


def test_a_task_with_no_row_of_its_own_is_capped_by_its_message_id(
    inbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exit's finish whose worker dies every time: the message keeps its id across
    redeliveries, and the attempts counted on it stop it after TASK_MAX_RETRIES + 1."""
    ran: list[str] = []
    monkeypatch.setattr(exits, "finish", lambda *a, **k: ran.append("finish"))
    task, args = jobs.finish_exit, (7,)
    with session_scope() as session:
        # Three deliveries began and never ended (their worker was killed each time).
        session.add(
            TaskAttempt(
                task_id="msg-1", task=task.name, attempts=3, first_at=utcnow(), last_at=utcnow()
            )
        )

    # As the worker runs a delivered message: with its id in the request.
    task.apply(args=args, task_id="msg-1")

    assert ran == []
    with session_scope() as session:
        letter = session.scalars(select(DeadLetter)).one()
        counted = session.get(TaskAttempt, "msg-1")
        assert counted is not None and counted.attempts == 4
    assert (letter.reason, letter.task, letter.subject, letter.attempts) == (
        "too_many_attempts",
        task.name,
        f"{task.name}:msg-1",
        4,
    )


def _exit_request(district_id: str) -> str:
    with session_scope() as session:
        return operator_requests.ask(session, RequestKind.EXIT, district_id, by="test").id


def test_an_exit_start_is_capped_on_its_request_row_across_messages(
    inbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exit's start whose worker dies every time, sent again by the relay under new task ids:
    its attempts are counted on its request, which is dead-lettered after TASK_MAX_RETRIES + 1."""
    ran: list[str] = []
    monkeypatch.setattr(exits, "start_exit", lambda *a, **k: ran.append("start"))
    request_id = _exit_request("d1")
    with session_scope() as session:
        # Three deliveries began and never ended (their worker was killed each time).
        session.execute(
            update(OperatorRequest).where(OperatorRequest.id == request_id).values(attempts=3)
        )

    jobs.district_exit.apply(args=("d1", request_id), task_id="relayed-again")

    assert ran == []
    with session_scope() as session:
        letter = session.scalars(select(DeadLetter)).one()
        asked = session.get(OperatorRequest, request_id)
        assert asked is not None and (asked.status, asked.attempts) == ("dead", 4)
    assert (letter.reason, letter.subject, letter.attempts, letter.args) == (
        "too_many_attempts",
        f"request:{request_id}",
        4,
        {"district_id": "d1", "request_id": request_id},
    )


@pytest.mark.parametrize(
    "args",
    [
        ("d1", "ops"),  # the shape the start had before it was a request
        ("d1", "0" * 32),  # a request id no row has
        ("d2", "request of d1"),  # replaced below by d1's request: another district's
        ("d1", "d1's, done"),  # replaced below by d1's request, done already
    ],
    ids=["old shape", "no such request", "another district's", "done"],
)
def test_an_exit_start_acts_only_on_an_open_request_of_its_district(
    inbox: str, args: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    monkeypatch.setattr(exits, "start_exit", lambda *a, **k: ran.append("start"))
    request_id = _exit_request("d1")
    if args[1] == "request of d1":
        args = ("d2", request_id)
    if args[1] == "d1's, done":
        args = ("d1", request_id)
        with session_scope() as session:
            operator_requests.finish(session, request_id)

    assert jobs.district_exit.apply(args=args).get() is None

    assert ran == []
    with session_scope() as session:
        assert session.scalars(select(DeadLetter)).all() == []
        asked = session.get(OperatorRequest, request_id)
        assert asked is not None and asked.attempts == 0


def test_what_a_task_sends_after_commit_is_sent_once_its_work_committed(
    inbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []

    def work(session: Any, event_id: str, limits: Any) -> events.Routed:
        after_commit(lambda: order.append(event_row(event_id)[0]))
        session.get(RosterEvent, event_id).status = "done"
        order.append("work")
        return events.Routed(events.DONE)

    monkeypatch.setattr(events, "process_event", work)
    assert jobs.process_event(inbox) == "done"
    # The callback saw the committed row.
    assert order == ["work", "done"]


LOCK_TIMEOUT = OperationalError(
    "UPDATE accounts ...",
    {},
    psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
)


def test_only_task_max_retries_caps_the_retries_not_celerys_default(
    configure: Configure, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the shipped TASK_MAX_RETRIES (8), more than Celery's own default of three retries: a
    failure that lasts is tried TASK_MAX_RETRIES + 1 times, then it is a dead letter naming the
    real error, never a failure left to Celery (which acknowledges the message as finished)."""
    app.loader.import_default_modules()
    assert all(app.tasks[name].max_retries is None for name in TaskName)
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    with session_scope() as session:
        ingest(session, EVENT, source="webhook")
    tried: list[int] = []

    def locked(session: Any, event_id: str, limits: Any) -> None:
        tried.append(1)
        raise LOCK_TIMEOUT

    monkeypatch.setattr(events, "process_event", locked)
    # Run as a worker runs it; in-process, each retry runs at once instead of being sent.
    jobs.process_event.apply(args=(EVENT["id"],), task_id="msg-locked")
    most = get_settings().task_max_retries + 1
    assert most == 9
    assert event_row(str(EVENT["id"])) == ("dead", most)
    assert len(tried) == most * SHORT_TRIES
    with session_scope() as session:
        letter = session.scalars(select(DeadLetter)).one()
    assert (letter.reason, letter.exception, letter.attempts) == (
        "retries_exhausted",
        "LockNotAvailable",
        most,
    )
    assert letter.error == "canceling statement due to lock timeout"
    assert (letter.traceback or "").endswith(
        "LockNotAvailable: canceling statement due to lock timeout"
    )


def test_an_attempt_stopped_by_its_soft_time_limit_is_sent_again_then_dead_lettered(
    inbox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not tried again in the process the limit stopped (its hard limit is near): each attempt
    ends and is sent again; the last is a ``time_limit`` dead letter."""
    tried: list[int] = []

    def hangs(session: Any, event_id: str, limits: Any) -> None:
        tried.append(1)
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(events, "process_event", hangs)
    jobs.process_event.apply(args=(inbox,), task_id="msg-hangs")
    assert event_row(inbox) == ("dead", 3)  # TASK_MAX_RETRIES=2
    assert len(tried) == 3
    with session_scope() as session:
        letter = session.scalars(select(DeadLetter)).one()
    assert (letter.reason, letter.exception, letter.attempts) == (
        "time_limit",
        "SoftTimeLimitExceeded",
        3,
    )


def test_a_retry_the_broker_does_not_take_is_put_back_not_dropped(inbox: str) -> None:
    """Celery rejects a message whose retry cannot be sent, for good (``requeue=False``): its
    work would be lost. The base class puts it back instead, to be delivered again."""
    task = jobs.process_event
    task.push_request(id="msg-1", retries=0, is_eager=False, called_directly=False)
    try:
        with pytest.raises(Reject) as refused:
            task._send_again(LOCK_TIMEOUT, 1)
    finally:
        task.pop_request()
    assert refused.value.args[1:] == (True,)  # requeue


def test_after_commit_outside_a_task_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="outside a task"):
        after_commit(print)
