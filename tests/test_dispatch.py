"""Many messages sent at once (``worker.dispatch.send_one_of_many``): Celery's own messages, on
the queue each task is routed to, naming the task that sent them as their parent."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Task
from celery._state import _task_stack  # type: ignore[attr-defined]  # where a worker keeps its task

from worker import dispatch, jobs
from worker.celery_app import app
from worker.names import Queue, TaskName


def _messages(broker: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The queue's messages, oldest first, each with its body decoded."""
    messages = [json.loads(raw) for raw in reversed(broker.lrange(queue, 0, -1))]
    for message in messages:
        message["body"] = json.loads(base64.b64decode(message["body"]))
    return messages


@contextmanager
def _running(task: Task[Any, Any], task_id: str, root_id: str | None) -> Iterator[None]:
    """As a worker runs ``task``: its request on its stack, the task on Celery's."""
    task.push_request(id=task_id, root_id=root_id, called_directly=False)
    _task_stack.push(task)
    try:
        yield
    finally:
        _task_stack.pop()
        task.pop_request()


def test_messages_go_where_celery_routes_them_with_their_arguments(broker: redis.Redis) -> None:
    with app.producer_or_acquire() as producer, producer.batch():
        dispatch.send_one_of_many(producer, TaskName.PROCESS_EVENT, ("ev-1",), None)
        dispatch.send_one_of_many(producer, TaskName.EXIT_UNIT, (7, "teacher:t1"), Queue.FANOUT)

    (event,) = _messages(broker, Queue.EVENTS)  # task_routes: no queue named when sent
    (unit,) = _messages(broker, Queue.FANOUT)
    for message, name, args in (
        (event, TaskName.PROCESS_EVENT, ["ev-1"]),
        (unit, TaskName.EXIT_UNIT, [7, "teacher:t1"]),
    ):
        headers = message["headers"]
        assert headers["task"] == name
        assert message["body"][:2] == [args, {}]
        assert headers["argsrepr"] == repr(tuple(args))
        # Sent from no task: a message of its own lineage, as ``send_task`` makes it.
        assert headers["root_id"] == headers["id"] and headers["parent_id"] is None
        assert message["properties"]["correlation_id"] == headers["id"]
    assert event["headers"]["id"] != unit["headers"]["id"]


def test_a_message_sent_by_a_task_names_it_as_its_parent(broker: redis.Redis) -> None:
    with (
        _running(jobs.district_exit, "start-1", "root-1"),
        app.producer_or_acquire() as producer,
        producer.batch(),
    ):
        dispatch.send_one_of_many(producer, TaskName.EXIT_UNIT, (7, "teacher:t1"), None)
    with _running(jobs.district_exit, "start-2", None):
        dispatch.finish_exit(7)
        with app.producer_or_acquire() as producer, producer.batch():
            dispatch.send_one_of_many(producer, TaskName.FINISH_EXIT, (7,), None)

    first, *finishes = _messages(broker, Queue.FANOUT)
    assert (first["headers"]["parent_id"], first["headers"]["root_id"]) == ("start-1", "root-1")
    # Celery's own send_task (``finish_exit``) and ours agree: a task without a root is the root.
    assert [(m["headers"]["parent_id"], m["headers"]["root_id"]) for m in finishes] == [
        ("start-2", "start-2")
    ] * 2
