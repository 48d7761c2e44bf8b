"""docker-compose.yml's monitoring profile (SPEC §5.10): Prometheus and Grafana only under it, on
loopback, mounting files that exist, scraping the receiver's metrics with the ops token from a
secret, and Grafana provisioned with the dashboard and Prometheus.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from tests.support.compose import (
    EVERY_INTERFACE,
    MONITORING,
    ROOT,
    command,
    compose,
    resolved,
    service,
    split_command,
)
from tests.support.stack import OPS_TOKEN


def bind_mounts(name: str) -> dict[str, Path]:
    """A service's bind mounts of this repository's files: their target in the container, and
    the file or directory mounted."""
    mounts = {}
    for entry in resolved(service(name)["volumes"]):
        source, target = entry.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def prometheus_option(option: str) -> str:
    words = command("prometheus")
    return next(w.split("=", 1)[1] for w in words if w.startswith(f"--{option}="))


def mounted(name: str, target: str) -> Path:
    """The repository file a service sees at ``target`` (itself or within a mounted directory)."""
    for at, source in bind_mounts(name).items():
        if target == at:
            return source
        if target.startswith(at.rstrip("/") + "/"):
            return source / posixpath.relpath(target, at)
    raise AssertionError(f"{name} mounts nothing at {target}")


def test_prometheus_and_grafana_run_only_under_the_monitoring_profile() -> None:
    for name, svc in compose()["services"].items():
        assert svc.get("profiles") == (["monitoring"] if name in MONITORING else None), name


def test_the_monitoring_services_mount_files_that_exist_and_publish_on_loopback_only() -> None:
    for name in MONITORING:
        assert bind_mounts(name), name
        for target, source in bind_mounts(name).items():
            assert source.exists(), f"{name} mounts {source} at {target}: no such file"
            assert target.startswith("/etc/"), f"{name}: {target}: mount configuration read-only"
        for entry in resolved(service(name)["volumes"]):
            if entry.startswith("./"):
                assert entry.endswith(":ro"), f"{name}: {entry} should be read-only"
        for port in resolved(service(name)["ports"]):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_prometheus_loads_the_alert_rules_and_scrapes_the_receivers_metrics() -> None:
    config = yaml.safe_load(mounted("prometheus", prometheus_option("config.file")).read_text())
    rule_files = [mounted("prometheus", path) for path in config["rule_files"]]
    assert rule_files == [ROOT / "deploy" / "prometheus" / "alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    ((target,),) = [static["targets"] for static in job["static_configs"]]
    host, port = target.rsplit(":", 1)
    # The target is a listener of ours that serves /metrics: the ops listener where `serve` has
    # one (--ops-port), else its one listener, if that serves the ops routes.
    path, options = split_command(command(host))
    assert path == ["serve"], f"{target} is not a grassroots listener"
    served = dict(zip(options[::2], options[1::2], strict=False))
    if "--ops-port" in served:
        assert served["--ops-port"] == port, f"/metrics is on {served['--ops-port']}, not {port}"
        # Prometheus runs in its own container: a listener on loopback is out of its reach.
        assert served.get("--ops-host") == EVERY_INTERFACE, "the ops listener is on loopback"
    else:
        assert served["--port"] == port
        assert served.get("--routes", "all") in ("all", "ops")
    assert host in service("prometheus")["depends_on"]


def test_prometheus_scrapes_with_the_ops_token_from_a_secret_never_in_a_file() -> None:
    config_file = mounted("prometheus", prometheus_option("config.file"))
    (job,) = yaml.safe_load(config_file.read_text())["scrape_configs"]
    authorization = job["authorization"]
    assert set(authorization) == {"type", "credentials_file"}
    assert authorization["type"] == "Bearer"
    secret = posixpath.relpath(authorization["credentials_file"], "/run/secrets")
    assert secret in service("prometheus")["secrets"]
    assert compose()["secrets"][secret] == {"environment": "OPS_TOKEN"}
    assert OPS_TOKEN not in config_file.read_text()


def test_grafana_gets_the_dashboard_and_prometheus_provisioned() -> None:
    provisioning = mounted("grafana", "/etc/grafana/provisioning")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = urlsplit(source["url"])
    assert (source["type"], url.hostname) == ("prometheus", "prometheus")
    assert "--web.listen-address" not in " ".join(command("prometheus"))  # its default, 9090
    assert url.port == 9090
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "grassroots.yml").read_text())[
        "providers"
    ]
    folder = provider["options"]["path"]
    dashboard = mounted("grafana", f"{folder}/grassroots.json")
    assert dashboard == ROOT / "deploy" / "grafana" / "grassroots.json"
    assert json.loads(dashboard.read_text())["uid"] == "grassroots"
    password = service("grafana")["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    secret = posixpath.relpath(password, "/run/secrets")
    assert secret in service("grafana")["secrets"]
    assert "environment" in compose()["secrets"][secret]
    assert service("grafana")["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
