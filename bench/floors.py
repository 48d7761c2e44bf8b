"""The floors of a district exit: what its two phases would cost with nothing of ours in them.

- ``noop``: as many Celery tasks as the exit has teacher units, each returning at once, sent as
  ``worker.dispatch.dispatch_exit`` sends units (batches of ``DISPATCH_CHUNK`` on one producer,
  to the ``fanout`` queue) and run by ``grassroots worker`` itself: the project's Celery app,
  settings (late acks, prefetch 1, the pool size asked for), queues and broker transport
  (``worker/broker.py``), with one more task registered that is a plain ``celery.Task``, so
  none of the project's per-task work (attempt ledger, session) runs. Timed from the first send
  to the broker holding none of them, waiting or unacknowledged.
- ``convert``: the exit of the same district without Celery: ``tasks.exits.start_exit`` in this
  process (not timed), then, over as many processes as the worker's pool has, each teacher unit
  as its task runs it (``tasks.teacher_units.count_and_run_teacher_unit``: the attempt count,
  then the unit), and each account batch by ``tasks.exits.run_unit`` in a transaction of its own
  (``worker.db.session_scope``), as the batch's task runs it. Each phase is timed from its first
  unit to its last: the batches' time is their floor; the teacher units' is the units' own work,
  which the exit's teacher phase pays on the same cores as Celery's per-task work (the no-op
  floor).

``bench/exit_pipeline.py`` runs both as subprocesses, alternated with the real exit; run alone:

    DATABASE_URL=… BROKER_URL=… python -m bench.floors worker --concurrency 2   # the worker
    DATABASE_URL=… BROKER_URL=… python -m bench.floors noop 4000                # JSON: seconds
    DATABASE_URL=… python -m bench.floors convert DISTRICT_ID --concurrency 2     # JSON: seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

NOOP = "bench.noop"
# How long the broker must stay empty to count as drained: between a worker's BRPOP and its
# record of the message as unacknowledged, the message is in neither place for a moment.
DRAINED_FOR = 0.05


def run_worker(argv: list[str]) -> None:
    """``grassroots worker`` with ``argv``, its app knowing the no-op task as well."""
    from celery import Task

    from worker.celery_app import app
    from worker.cli.processes import worker

    @app.task(name=NOOP, base=Task)
    def noop(*_: Any) -> None:
        return None

    worker.main(args=argv, prog_name="grassroots worker")


def send_noops(count: int) -> float:
    """Seconds from the first of ``count`` no-op tasks sent to none left in the broker."""
    from tasks.sql import chunks
    from worker.broker import broker_client, queue_depths
    from worker.celery_app import QUEUES, app
    from worker.dispatch import DISPATCH_CHUNK, send_one_of_many
    from worker.names import Queue

    client = broker_client()
    # Arguments the size of a teacher unit's (an exit id, a key).
    keys = [f"teacher:{n:024x}" for n in range(count)]
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for chunk in chunks(keys, DISPATCH_CHUNK):
            with producer.batch():
                for key in chunk:
                    send_one_of_many(producer, NOOP, (1, key), Queue.FANOUT)
    empty_since: float | None = None
    while True:
        now = time.monotonic()
        depths, unacked = queue_depths(client, QUEUES)
        if sum(depths.values()) or unacked:
            empty_since = None
        elif empty_since is None:
            empty_since = now
        elif now - empty_since >= DRAINED_FOR:
            return empty_since - started
        time.sleep(0.005)


def _run_teacher_unit(exit_id: int, key: str, max_attempts: int) -> None:
    from tasks.teacher_units import count_and_run_teacher_unit
    from worker.db import autocommit

    with autocommit() as conn:
        _, result = count_and_run_teacher_unit(conn, exit_id, key, max_attempts=max_attempts)
    if result is None or not result.ran:
        raise RuntimeError(f"teacher unit {key} did not run")


def _run_batch(exit_id: int, key: str) -> None:
    from tasks.exits import run_unit
    from worker.db import session_scope

    with session_scope() as session:
        if not run_unit(session, exit_id, key).ran:
            raise RuntimeError(f"batch {key} did not run")


def _connect() -> None:
    from sqlalchemy import text

    from worker.db import session_scope

    with session_scope() as session:
        session.execute(text("SELECT 1"))


def _timed(pool: ProcessPoolExecutor, run: Callable[..., None], *args: tuple[Any, ...]) -> float:
    """Seconds to run ``run(*a)`` for every ``a`` in ``args`` over ``pool``."""
    started = time.monotonic()
    for future in [pool.submit(run, *a) for a in args]:
        future.result()
    return time.monotonic() - started


def convert(district_id: str, concurrency: int) -> dict[str, Any]:
    """The exit of the district without Celery, its teacher units and its account batches each
    timed (module docstring)."""
    from tasks.exits import ACCOUNTS_UNIT, TEACHER_UNIT, pending_units, start_exit
    from worker.db import get_engine, session_scope
    from worker.settings import get_settings

    settings = get_settings()
    started = time.monotonic()
    with session_scope() as session:
        plan = start_exit(
            session, district_id, trigger="bench:floor", batch_size=settings.exit_batch_size
        )
    prepared = time.monotonic() - started
    teachers = [key for key, _ in plan.pending if key.startswith(TEACHER_UNIT)]
    most = settings.task_max_retries + 1
    # The pool's processes open connections of their own: none may inherit this one's.
    get_engine().dispose()
    with ProcessPoolExecutor(concurrency, mp_context=get_context("fork")) as pool:
        for future in [pool.submit(_connect) for _ in range(concurrency)]:
            future.result()
        teacher_s = _timed(pool, _run_teacher_unit, *((plan.exit_id, k, most) for k in teachers))
        with session_scope() as session:
            batches = [key for key, _ in pending_units(session, plan.exit_id)]
        if not all(key.startswith(ACCOUNTS_UNIT) for key in batches):
            raise RuntimeError("teacher units are left after running them all")
        seconds = _timed(pool, _run_batch, *((plan.exit_id, key) for key in batches))
    return {
        "batches": len(batches),
        "seconds": seconds,
        "teacher_units": len(teachers),
        "teacher_units_s": teacher_s,
        "prepare_s": prepared,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="grassroots worker, with the no-op task (its options follow)")
    noop = sub.add_parser("noop", help="send N no-op tasks, print the seconds until all ran")
    noop.add_argument("count", type=int)
    conv = sub.add_parser("convert", help="exit a district, time its batches without Celery")
    conv.add_argument("district")
    conv.add_argument("--concurrency", type=int, default=2)
    args, rest = parser.parse_known_args()
    if args.command == "worker":
        run_worker(rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    elif args.command == "noop":
        print(json.dumps({"tasks": args.count, "seconds": send_noops(args.count)}))
    else:
        print(json.dumps(convert(args.district, args.concurrency)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
