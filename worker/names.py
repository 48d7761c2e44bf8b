"""Every task's name and queue, once: the Celery app routes by them, senders send by them, and a
test pins them (renaming a task orphans the messages already queued). Kept apart from the task
base class (``worker.tasking``) so that configuring or sending needs none of the task machinery.
"""

from __future__ import annotations

from enum import StrEnum


class TaskName(StrEnum):
    """Every task's explicit, stable name: renaming one orphans the messages already queued."""

    PROCESS_EVENT = "grassroots.process_event"
    DISTRICT_EXIT = "grassroots.district_exit"
    EXIT_UNIT = "grassroots.exit_unit"
    FINISH_EXIT = "grassroots.finish_exit"
    PURGE = "grassroots.purge"
    POLL = "grassroots.poll"
    SYNC = "grassroots.sync"  # one district's roster sync
    SYNC_ALL = "grassroots.sync_all"  # the scheduled syncs of every district with a token
    HEARTBEAT = "grassroots.heartbeat"  # proof that a worker takes work from the events queue
    # The deferred events of roster pauses that ended or were removed, back to the workers.
    RELEASE_DEFERRED = "grassroots.release_deferred"


class Queue(StrEnum):
    EVENTS = "events"  # one task per roster event
    CONVERSIONS = "conversions"  # an exit's account batches
    FANOUT = "fanout"  # an exit's start, teacher units and finish
    MAINTENANCE = "maintenance"  # the periodic housekeeping: not work in flight


ROUTES: dict[str, dict[str, str]] = {
    TaskName.PROCESS_EVENT: {"queue": Queue.EVENTS},
    TaskName.DISTRICT_EXIT: {"queue": Queue.FANOUT},
    TaskName.EXIT_UNIT: {"queue": Queue.FANOUT},
    TaskName.FINISH_EXIT: {"queue": Queue.FANOUT},
    TaskName.PURGE: {"queue": Queue.MAINTENANCE},
    TaskName.POLL: {"queue": Queue.MAINTENANCE},
    TaskName.SYNC: {"queue": Queue.MAINTENANCE},
    TaskName.SYNC_ALL: {"queue": Queue.MAINTENANCE},
    TaskName.RELEASE_DEFERRED: {"queue": Queue.MAINTENANCE},
    # Through the queue whose stall matters: its age says how long that queue has not moved.
    TaskName.HEARTBEAT: {"queue": Queue.EVENTS},
}
