"""The monitoring files (``deploy/``) read for the tests, the metric names a PromQL expression
names, and a real Prometheus (Debian's ``prometheus`` binary) in a temporary directory, on
loopback, scraping a running stack's ``/metrics`` with the ops token and evaluating
``deploy/prometheus/alerts.yml`` every second.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.process_logs import register
from tests.support.stack import OPS_TOKEN, spare_port, terminate_group, wait_until

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "grassroots.json"
SPEC = ROOT / "tests" / "fixtures" / "SPEC.md"


def _spec_alerts() -> tuple[str, ...]:
    """The alerts SPEC §5.10 names."""
    section = SPEC.read_text().split("### 5.10", 1)[1].split("\n## ", 1)[0]
    return tuple(dict.fromkeys(re.findall(r"`(Grassroots[A-Za-z]+)`", section)))


SPEC_ALERTS = _spec_alerts()


@cache
def alert_rules() -> dict[str, dict[str, Any]]:
    """Every alerting rule of ``alerts.yml``, by its name."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def dashboard_queries() -> list[tuple[str, str]]:
    """Every query of the dashboard, with its panel's title (panels nested in rows too)."""
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


# What is not a metric name in PromQL: strings, label matchers, ranges, grouping clauses, Grafana's
# variables; and then keywords. A name followed by ``(`` is a function or an aggregation.
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_NOT_NAMES = re.compile(
    r"\{[^}]*\}|\[[^\]]*\]|\$\w+"
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
_IDENTIFIER = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(?!\s*\()")
KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    bare = _NOT_NAMES.sub(" ", _STRINGS.sub(" ", expr))
    return {name for name in _IDENTIFIER.findall(bare) if name.lower() not in KEYWORDS}


class Prometheus:
    """A Prometheus that scrapes ``target`` (host:port) every second with the ops token and
    evaluates the rule file every second."""

    def __init__(self, directory: Path, target: str) -> None:
        self.directory = directory
        self.target = target
        self.port = spare_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: apt-get install prometheus"
        self.directory.mkdir(parents=True, exist_ok=True)
        token = self.directory / "ops_token"
        token.write_text(OPS_TOKEN)
        token.chmod(0o600)
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "grassroots",
                    "authorization": {"type": "Bearer", "credentials_file": str(token)},
                    "static_configs": [{"targets": [self.target]}],
                }
            ],
        }
        (self.directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        with (self.directory / "prometheus.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.directory / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        register("prometheus", self.directory / "prometheus.log", self.proc)
        wait_until(self._scraped, timeout=60, what=f"Prometheus to scrape {self.target}")

    def log(self) -> str:
        return (self.directory / "prometheus.log").read_text(errors="replace")

    def _get(self, path: str) -> Any:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        try:
            response = httpx.get(f"{self.base}{path}", timeout=5)
        except httpx.HTTPError:
            return None
        return response.json()["data"] if response.status_code == 200 else None

    def _scraped(self) -> bool:
        """The target scraped, and answering (``up`` 1)."""
        targets = self._get("/api/v1/targets")
        return bool(targets) and any(
            t["health"] == "up" for t in targets["activeTargets"] if t["scrapePool"] == "grassroots"
        )

    def alerts(self) -> dict[str, str]:
        """The alerts pending or firing now, by name (the state of the worst instance)."""
        found: dict[str, str] = {}
        for alert in (self._get("/api/v1/alerts") or {"alerts": []})["alerts"]:
            name, state = alert["labels"]["alertname"], alert["state"]
            if found.get(name) != "firing":
                found[name] = state
        return found

    def evaluated_since(self, after: float) -> bool:
        """Every rule group evaluated after ``after`` (a Unix time): its alerts are current."""
        groups = self._get("/api/v1/rules")
        return bool(groups) and all(
            _unix(group["lastEvaluation"]) > after for group in groups["groups"]
        )

    def stop(self) -> None:
        if self.proc is not None:
            terminate_group(self.proc, within=15)
            self.proc = None


def _unix(rfc3339: str) -> float:
    """Prometheus' times carry nanoseconds: Python reads up to microseconds."""
    whole, _, fraction = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{whole}.{(fraction or '0')[:6]}+00:00").timestamp()


@contextmanager
def running_prometheus(directory: Path, target: str) -> Iterator[Prometheus]:
    prometheus = Prometheus(directory, target)
    try:
        prometheus.start()
        yield prometheus
    finally:
        prometheus.stop()
