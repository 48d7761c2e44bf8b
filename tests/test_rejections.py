"""Webhooks refused for their signature are counted by reason in /metrics, across every receiver
process, and logged at WARNING, throttled, without the body or any header's value: a receiver
whose clock drifts past the tolerance refuses everything, and says so."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.stack import OPS_TOKEN, SECRET, RedisServer
from worker import api, rejections
from worker.metrics import PipelineCollector
from worker.rejections import Rejections
from worker.signing import SignatureError, signed_headers

STRANGER = "whsec_" + base64.b64encode(b"somebody-else-webhook-secret-32b").decode()
BODY = json.dumps({"id": "evt-refused", "type": "users.updated", "data": {}}).encode()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("rejections")) as server:
        yield server


@pytest.fixture
def client(broker: RedisServer) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(broker.url) as found:
        found.delete(rejections.KEY)
        yield found


def stale(seconds: int = 400) -> SignatureError:
    return SignatureError(
        "stale_timestamp", f"webhook-timestamp is {seconds}s old, over the 300s limit"
    )


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "grassroots.api"]


def test_the_first_refusal_of_a_reason_is_logged_then_one_line_a_minute_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    counted = Rejections(clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "grassroots.api")

    for _ in range(5):
        counted.add(stale())
        now[0] += 1
    counted.add(SignatureError("bad_signature", "no v1 signature matches a known secret"))

    assert messages(caplog) == [
        "webhook refused with 401 (stale_timestamp): webhook-timestamp is 400s old, over the"
        " 300s limit; further refusals are counted in /metrics and logged at most once a minute"
        " per reason",
        "webhook refused with 401 (bad_signature): no v1 signature matches a known secret;"
        " further refusals are counted in /metrics and logged at most once a minute per reason",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()

    now[0] = 59.9
    counted.log_overdue()
    assert messages(caplog) == []
    now[0] = 60.0
    counted.log_overdue()  # a burst that stopped is still reported once its minute is up
    assert messages(caplog) == [
        "4 webhook(s) refused with 401 (stale_timestamp) in the last 60 s; the last:"
        " webhook-timestamp is 400s old, over the 300s limit"
    ]
    assert (caplog.records[0].reason, caplog.records[0].count) == ("stale_timestamp", 4)  # type: ignore[attr-defined]
    caplog.clear()
    counted.log_overdue()
    assert messages(caplog) == []
    assert counted.unsent == 6


def test_a_timestamp_that_is_not_a_number_is_never_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "grassroots.api")
    Rejections().add(SignatureError("bad_timestamp", "webhook-timestamp is not a unix time: 'x<>'"))

    assert messages(caplog) == [
        "webhook refused with 401 (bad_timestamp); further refusals are counted in /metrics and"
        " logged at most once a minute per reason"
    ]


def test_every_process_adds_to_the_same_counts_and_keeps_its_tally_while_redis_is_away(
    client: redis.Redis,
) -> None:
    one, other = Rejections(), Rejections()
    one.add(stale())
    one.add(stale())
    other.add(stale())
    other.add(SignatureError("missing_headers", "missing webhook headers: webhook-id"))

    with redis.Redis.from_url(CLOSED_BROKER) as away:
        assert one.send(away) is False
    assert one.unsent == 2
    assert one.send(client) and other.send(client)

    assert one.unsent == other.unsent == 0
    assert rejections.totals(client) == {
        "missing_headers": 1,
        "bad_timestamp": 0,
        "stale_timestamp": 3,
        "bad_signature": 0,
        "no_secret": 0,
    }


def test_refused_signatures_are_counted_by_reason_in_metrics(
    configure: Configure,
    database_url: str,
    broker: RedisServer,
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    configure(
        DATABASE_URL=database_url,
        BROKER_URL=broker.url,
        WEBHOOK_SECRETS=SECRET,
        OPS_TOKEN=OPS_TOKEN,
    )
    monkeypatch.setattr(rejections, "REJECTIONS", Rejections())
    for collector in list(api.registry._collector_to_names):
        if isinstance(collector, PipelineCollector):
            monkeypatch.setattr(collector, "cache_seconds", 0)
    caplog.set_level(logging.WARNING, "grassroots.api")
    json_type = {"content-type": "application/json"}
    drifted = signed_headers(SECRET, BODY, timestamp=int(time.time()) - 400)

    with TestClient(api.app) as http:
        for headers in (signed_headers(STRANGER, BODY), signed_headers(STRANGER, BODY), drifted):
            refused = http.post("/webhooks/clever", content=BODY, headers={**json_type, **headers})
            assert refused.status_code == 401
        scraped = http.get("/metrics", headers={"authorization": f"Bearer {OPS_TOKEN}"})

    assert scraped.status_code == 200
    lines = scraped.text.splitlines()
    assert "# TYPE grassroots_webhook_signature_rejections_total counter" in lines
    assert 'grassroots_webhook_signature_rejections_total{reason="bad_signature"} 2.0' in lines
    assert 'grassroots_webhook_signature_rejections_total{reason="stale_timestamp"} 1.0' in lines
    assert 'grassroots_webhook_signature_rejections_total{reason="missing_headers"} 0.0' in lines
    logged = "\n".join(messages(caplog))
    assert "(bad_signature)" in logged and "(stale_timestamp)" in logged
    for header in (*signed_headers(STRANGER, BODY).values(), *drifted.values()):
        if header.startswith("v1,"):
            assert header not in logged
    assert BODY.decode() not in logged and "evt-refused" not in logged


def test_the_receiver_sends_its_tally_on_its_own_and_at_shutdown(
    configure: Configure, broker: RedisServer, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure(BROKER_URL=broker.url, WEBHOOK_SECRETS=SECRET)
    monkeypatch.setattr(rejections, "REJECTIONS", Rejections())
    headers = {"content-type": "application/json", **signed_headers(STRANGER, BODY)}

    with TestClient(api.webhooks_app) as http:
        assert http.post("/webhooks/clever", content=BODY, headers=headers).status_code == 401
    # Nobody scraped this listener: its shutdown sent what it counted.
    assert rejections.totals(client)["bad_signature"] == 1
