"""The judging scenario of SPEC §5.10, against a real Prometheus (Debian's package) that loads
``deploy/prometheus/alerts.yml`` and scrapes a running stack's ``/metrics`` with the ops token:
while the stack is idle none of the named alerts is pending or firing; once a conversion is
dead-lettered ``GrassrootsDeadLetters`` is; once an exit is stalled ``GrassrootsExitStalled`` is.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from tests.support import scenario
from tests.support.databases import PgDatabases
from tests.support.faults import deleted, seed_copy
from tests.support.prometheus import SPEC_ALERTS, Prometheus, running_prometheus
from tests.support.stack import running_stack, wait_until

# Postgres refuses the statements the scenario breaks, as a database trigger or constraint would
# in production: a permanent error, dead-lettered at the first attempt.
REFUSE = (
    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
)


def refuse_updates(url: str, table: str, where: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(
            f"CREATE TRIGGER refuse_{table} BEFORE UPDATE ON {table} FOR EACH ROW"
            f" WHEN ({where}) EXECUTE FUNCTION refuse()"
        )


def active(prometheus: Prometheus, name: str) -> str | None:
    """The state of the alert ``name`` if it is pending or firing."""
    state = prometheus.alerts().get(name)
    return state if state in ("pending", "firing") else None


@pytest.mark.slow
def test_a_real_prometheus_raises_the_named_alerts_when_work_strands(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    url = pg_databases.new()
    with running_stack(tmp_path, url, beat=True) as stack:
        copy = seed_copy(stack, "a1e1")
        stack.wait_idle()
        with running_prometheus(tmp_path / "prometheus", f"127.0.0.1:{stack.port}") as prometheus:
            # Idle: once the rules have been evaluated over a scrape of the idle stack, none of
            # the named alerts is pending or firing.
            scraped = time.time()
            wait_until(
                lambda: prometheus.evaluated_since(scraped + 2),
                timeout=30,
                what="the rules evaluated over a scrape of the idle stack",
            )
            assert prometheus.alerts() == {}
            assert len(SPEC_ALERTS) == 7

            with psycopg.connect(url) as conn:
                conn.execute(REFUSE)
            # A conversion that dead-letters.
            refuse_updates(url, "accounts", f"OLD.id = '{copy(scenario.STEVE)}'")
            event = deleted(copy, "dead", scenario.STEVE)
            assert stack.post(event).status_code == 202
            wait_until(
                lambda: active(prometheus, "GrassrootsDeadLetters"),
                timeout=60,
                what="GrassrootsDeadLetters pending or firing",
            )
            assert stack.event(event["id"])["status"] == "dead"

            # An exit whose teacher units die: stalled.
            district = copy(scenario.DISTRICT)
            refuse_updates(url, "classes", f"OLD.district_id = '{district}'")
            stack.cli("district", "exit", district)
            wait_until(
                lambda: active(prometheus, "GrassrootsExitStalled"),
                timeout=90,
                what="GrassrootsExitStalled pending or firing",
            )
            progress = stack.ops("GET", f"/ops/districts/{district}/exit").json()
            assert progress["status"] == "stalled"
