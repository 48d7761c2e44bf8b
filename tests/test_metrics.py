"""The Prometheus metrics: conversions labelled by role and outcome from the journal's rule, and
the inbox's events by type and current status as a gauge (a status's count goes down)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import update

from models import RosterEvent
from tasks.conversion.rules import rule_outcome
from tasks.inbox import inbox_row, store
from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.scenario import DISTRICT, STEVE
from worker.db import session_scope
from worker.metrics import PipelineCollector


@pytest.mark.parametrize(
    ("rule", "labels"),
    [
        ("student", ("student", "converted")),
        ("admin+teacher:remove", ("admin+teacher", "converted")),
        ("admin:remove", ("admin", "removed")),
        ("admin:convert", ("admin", "converted")),
        ("lost:admin", ("admin", "role_removed")),
        ("lost:student+teacher", ("student+teacher", "role_removed")),
    ],
)
def test_conversion_rules_map_to_role_and_outcome(rule: str, labels: tuple[str, str]) -> None:
    assert rule_outcome(rule) == labels


def _store(*events: tuple[str, str]) -> None:
    rows = [
        inbox_row(
            {
                "id": event_id,
                "type": type_,
                "created": "2025-09-03T14:05:21.900Z",
                "data": {"object": {"id": STEVE, "district": DISTRICT}},
            },
            source="webhook",
        )
        for event_id, type_ in events
    ]
    with session_scope() as session:
        store(session, rows)


def test_events_by_status_are_a_gauge_that_goes_down_as_events_move_on(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    registry = CollectorRegistry()
    registry.register(PipelineCollector())
    _store(("m-1", "users.deleted"), ("m-2", "users.deleted"), ("m-3", "sections.updated"))

    def events(status: str, type_: str = "users.deleted") -> float | None:
        return registry.get_sample_value("grassroots_events", {"type": type_, "status": status})

    assert (events("accepted"), events("accepted", "sections.updated")) == (2, 1)
    with session_scope() as session:
        session.execute(update(RosterEvent).where(RosterEvent.id == "m-1").values(status="done"))
    assert (events("accepted"), events("done")) == (1, 1)

    text = generate_latest(registry).decode()
    assert "# TYPE grassroots_events gauge" in text.splitlines()
    assert "grassroots_events_total" not in text


def test_registering_the_collector_scrapes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The receiver registers it at import, before any database or broker need answer.
    def scrape(self: PipelineCollector) -> None:
        raise AssertionError("scraped at registration")

    monkeypatch.setattr(PipelineCollector, "collect", scrape)
    CollectorRegistry(auto_describe=True).register(PipelineCollector())
