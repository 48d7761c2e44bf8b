"""The Celery tasks: thin adapters over the units of work in ``tasks/``.

Each passes ids, never objects, and declares only its own work; session scope, attempt counting,
retries, dead letters and log context are the base class's (``worker.tasking.GrassrootsTask``).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from models import RequestKind, SyncStatus, utcnow
from tasks import events, exits, operator_requests, pauses, retention, roster_syncs, teacher_units
from tasks.attempts import EventLedger, UnitLedger
from tasks.heartbeat import HeartbeatLedger
from tasks.heartbeat import record as record_heartbeat
from tasks.operator_requests import RequestLedger
from worker import dispatch, sync
from worker.celery_app import app
from worker.clever import DistrictToken, parse_tokens
from worker.db import autocommit, get_engine, session_scope
from worker.names import TaskName
from worker.poller import PollOptions, poll_all
from worker.settings import get_settings
from worker.tasking import FirstTry, GrassrootsTask, after_commit


def limits() -> events.Limits:
    settings = get_settings()
    return events.Limits(
        retention_days=settings.retention_days, brake_percent=settings.removal_brake_percent
    )


@app.task(bind=True, base=GrassrootsTask, name=TaskName.PROCESS_EVENT, ledger=EventLedger)
def process_event(self: GrassrootsTask, event_id: str) -> str | None:
    routed = events.process_event(self.session, event_id, limits())
    if routed is None:
        return None
    if routed.exit_plan is not None:
        after_commit(dispatch.dispatch_started, routed.exit_plan)
    return routed.status


@app.task(
    bind=True,
    base=GrassrootsTask,
    name=TaskName.DISTRICT_EXIT,
    ledger=RequestLedger.of(RequestKind.EXIT),
)
def district_exit(self: GrassrootsTask, district_id: str, request_id: str) -> int:
    """The start of the exit that request ``request_id`` asks for: its trigger is the row's."""
    asked = operator_requests.found(self.session, request_id)
    plan = exits.start_exit(
        self.session, district_id, trigger=asked.by, batch_size=get_settings().exit_batch_size
    )
    operator_requests.finish(self.session, request_id)
    after_commit(dispatch.dispatch_started, plan)
    return plan.exit_id


def _carry_on(exit_id: int, result: exits.UnitResult) -> None:
    """What a unit's completion starts: the finish after the last unit, the account batches
    after the last teacher unit."""
    if result.exit_complete:
        after_commit(dispatch.finish_exit, exit_id)
    elif result.teachers_complete:
        after_commit(dispatch.dispatch_exit, exit_id)


class ExitUnitTask(GrassrootsTask):
    def first_try(self, most: int, *args: Any, **kwargs: Any) -> FirstTry | None:
        unit = UnitLedger(*args, **kwargs)
        exit_id, key = unit.exit_id, unit.key
        if not teacher_units.can_count_and_run(get_engine().dialect, key):
            return None
        # Thousands of these per district: the count, then the unit as one statement.
        with autocommit() as conn:
            try:
                attempts, result = teacher_units.count_and_run_teacher_unit(
                    conn, exit_id, key, max_attempts=most
                )
            except teacher_units.TeacherUnitFailed as failed:
                return FirstTry(failed.attempts, error=failed.error)
        if result is None:
            return FirstTry(attempts)
        _carry_on(exit_id, result)
        return FirstTry(attempts, result.ran)


@app.task(bind=True, base=ExitUnitTask, name=TaskName.EXIT_UNIT, ledger=UnitLedger)
def exit_unit(self: GrassrootsTask, exit_id: int, key: str) -> bool:
    # An exit unit commits without waiting for the WAL flush (``tasks.sql.AsyncCommit``).
    result = exits.run_unit(self.session, exit_id, key)
    _carry_on(exit_id, result)
    return result.ran


@app.task(bind=True, base=GrassrootsTask, name=TaskName.FINISH_EXIT)
def finish_exit(self: GrassrootsTask, exit_id: int) -> bool:
    return exits.finish(self.session, exit_id) is not None


@app.task(bind=True, base=GrassrootsTask, name=TaskName.PURGE)
def purge(self: GrassrootsTask) -> dict[str, int]:
    purged = retention.purge(self.session, retention_days=get_settings().retention_days)
    return purged.as_dict()


@app.task(bind=True, base=GrassrootsTask, name=TaskName.RELEASE_DEFERRED)
def release_deferred(self: GrassrootsTask) -> int:
    """What roster pauses that ended (or were removed) deferred, sent in Clever order once the
    release has committed; the fence and the brake decide when each is processed."""
    released = pauses.release_due(self.session, now=utcnow())
    if released:
        after_commit(dispatch.enqueue_events, released)
    return len(released)


@app.task(bind=True, base=GrassrootsTask, name=TaskName.POLL, session_scoped=False)
def poll(self: GrassrootsTask) -> dict[str, str]:
    """One pass over every district; returns each district's outcome. A district that failed is
    read again, from its committed cursor, by the next pass. The tokens are read from the
    worker's environment: they never travel through the broker."""
    settings = get_settings()
    results = poll_all(
        session_scope,
        parse_tokens(settings.clever_district_tokens),
        options=PollOptions.from_settings(settings),
    )
    for result in results:
        if result.needs_resync:
            sync.resync_if_due(result.district_id)
    return {result.district_id: result.outcome for result in results}


def _token(district_id: str) -> DistrictToken | None:
    tokens = parse_tokens(get_settings().clever_district_tokens)
    return next((t for t in tokens if t.district_id == district_id), None)


@app.task(
    bind=True,
    base=GrassrootsTask,
    name=TaskName.SYNC,
    ledger=RequestLedger.of(RequestKind.SYNC),
    session_scoped=False,
)
def sync_district(self: GrassrootsTask, district_id: str, request_id: str) -> str:
    """The roster sync that request ``request_id`` asks for (its id is the sync's). The token
    is read from the worker's environment: it never travels through the broker."""
    with session_scope() as session:
        asked = operator_requests.found(session, request_id)
    token = _token(district_id)
    if token is None:
        status: str = SyncStatus.FAILED
        with session_scope() as session:
            roster_syncs.fail(session, request_id, "CLEVER_DISTRICT_TOKENS has no token for it")
    else:
        status = sync.sync_district(
            token,
            sync.SyncOptions.from_settings(get_settings()),
            dry_run=asked.dry_run,
            trigger=asked.by,
            sync_id=request_id,
        ).status
    with session_scope() as session:
        operator_requests.finish(session, request_id)
    return status


@app.task(bind=True, base=GrassrootsTask, name=TaskName.SYNC_ALL, session_scoped=False)
def sync_all(self: GrassrootsTask) -> dict[str, str]:
    """The scheduled syncs (every SYNC_INTERVAL): one task per district with a token, so the
    workers run them side by side."""
    return {
        token.district_id: sync.start(token.district_id, trigger="schedule")
        for token in parse_tokens(get_settings().clever_district_tokens)
    }


log = logging.getLogger("grassroots.tasks")


@app.task(
    bind=True,
    base=GrassrootsTask,
    name=TaskName.HEARTBEAT,
    ledger=HeartbeatLedger,
    session_scoped=False,
)
def heartbeat(self: GrassrootsTask) -> bool:
    """Stamp the heartbeat that ``/readyz`` reads. A beat that fails is neither retried nor
    dead-lettered: the heartbeat's age is the signal, and the next beat comes soon."""
    try:
        with session_scope() as session:
            record_heartbeat(session, host=self.request.hostname)
    except SQLAlchemyError as exc:
        log.warning("heartbeat not recorded: %s", type(exc).__name__)
        return False
    return True
