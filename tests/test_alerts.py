"""The alert rules of SPEC §5.10 (``deploy/prometheus/alerts.yml``) and the Grafana dashboard
(``deploy/grafana/grassroots.json``): the rules pass ``promtool``'s checks and their own unit
tests (``alerts.test.yml``), every named alert says how bad it is and what to do, and every rule
and dashboard query names only metrics a running receiver's ``/metrics`` exports.

``promtool`` comes with Debian's ``prometheus`` package (``.ci/run`` installs it when absent).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.databases import PgDatabases
from tests.support.prometheus import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARD,
    SPEC_ALERTS,
    alert_rules,
    dashboard_queries,
    metric_names,
)
from tests.support.stack import running_stack

# What Prometheus itself records of every scrape.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus (.ci/run does when absent)"
    return subprocess.run(
        [found, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_rules_pass_promtools_checks_and_unit_tests() -> None:
    checked = promtool("check", "rules", ALERTS)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", ALERTS_TEST)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_promtool_fails_a_rule_whose_unit_test_does_not_hold(tmp_path: Path) -> None:
    # The unit tests are not vacuous: the same tests over a rule file whose dead-letter alert
    # waits 5 minutes fail.
    (tmp_path / "alerts.yml").write_text(
        ALERTS.read_text().replace(
            "expr: sum by (task, reason) (grassroots_dead_letters_by_task) > 0",
            "expr: sum by (task, reason) (grassroots_dead_letters_by_task) > 0\n        for: 5m",
        )
    )
    shutil.copy(ALERTS_TEST, tmp_path / "alerts.test.yml")
    failed = promtool("test", "rules", tmp_path / "alerts.test.yml")
    assert failed.returncode != 0
    assert "alertname: GrassrootsDeadLetters" in failed.stdout + failed.stderr


def test_every_dashboard_query_is_promql_that_prometheus_parses(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = [
        {"record": f"dashboard:query_{n}", "expr": expr} for n, (_, expr) in enumerate(queries)
    ]
    check = tmp_path / "dashboard.rules.yml"
    check.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = promtool("check", "rules", check)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    broken = tmp_path / "broken.rules.yml"
    broken.write_text(check.read_text().replace(rules[0]["expr"], "sum by (type (x)", 1))
    assert promtool("check", "rules", broken).returncode != 0


def test_every_alert_of_the_spec_says_how_bad_and_what_to_do() -> None:
    rules = alert_rules()
    assert set(SPEC_ALERTS) <= set(rules), sorted(set(SPEC_ALERTS) - set(rules))
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        summary = rule["annotations"]["summary"]
        # A command to run, or a console page to open.
        assert re.search(r"`grassroots [a-z]|/console/|/readyz|/healthz", summary), (name, summary)


def test_the_metric_name_parser_sees_through_promql() -> None:
    expr = (
        'sum by (reason) (increase(a_total{job="x", reason=~"b.*"}[5m])) > 10'
        " and on() c > bool 2 or max without (d) (e_seconds offset 1h) unless"
        " histogram_quantile(0.9, rate(f_bucket[$__rate_interval])) > 1e3"
    )
    assert metric_names(expr) == {"a_total", "c", "e_seconds", "f_bucket"}


@pytest.mark.slow
def test_every_rule_and_dashboard_query_names_only_exported_metrics(
    tmp_path: Path, pg_databases: PgDatabases
) -> None:
    with running_stack(tmp_path, pg_databases.new(), workers=0) as stack:
        # With the ops token, on the listener that serves the ops API.
        scraped = stack.ops("GET", "/metrics")
    assert scraped.status_code == 200, scraped.text
    exported = set()
    for family in text_string_to_metric_families(scraped.text):
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
        if family.type == "counter":
            exported.add(f"{family.name}_total")
    assert "grassroots_dead_letters_by_task" in exported  # exported with no series yet
    exported |= PROMETHEUS_OWN
    queries = {f"alert {name}": rule["expr"] for name, rule in alert_rules().items()}
    queries.update({f"dashboard {title}": expr for title, expr in dashboard_queries()})
    assert any(key.startswith("dashboard ") for key in queries), DASHBOARD
    unknown = {
        where: sorted(names - exported)
        for where, expr in queries.items()
        if (names := metric_names(expr)) - exported
    }
    assert unknown == {}
    assert all(metric_names(expr) for expr in queries.values())
