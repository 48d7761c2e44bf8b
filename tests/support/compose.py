"""docker-compose.yml read as compose reads it, for the compose tests (``tests/test_compose*.py``,
``tests/test_image.py``): the file interpolated by compose's rules with only the secrets set, a
service's environment and command, and the SPEC's list of variables.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.support.stack import FLOWER_BASIC_AUTH, OPS_TOKEN, SECRET

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SPEC = ROOT / "tests" / "fixtures" / "SPEC.md"

# The long-running processes, and with the migration every service that runs our image.
PROCESSES = ("receiver", "worker", "beat", "flower")
OUR_SERVICES = ("migrate", *PROCESSES)
# The services of the monitoring profile (SPEC §5.10).
MONITORING = ("prometheus", "grafana")
# What compose must refuse to start without; test values for the rest of the compose tests.
SECRETS = {
    "POSTGRES_PASSWORD": "pg-password",
    "REDIS_PASSWORD": "redis-password-for-tests",
    "WEBHOOK_SECRETS": SECRET,
    "OPS_TOKEN": OPS_TOKEN,
    "FLOWER_BASIC_AUTH": FLOWER_BASIC_AUTH,
}
# Inside a container, the receiver and Flower must listen on every interface to be reachable.
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104


# --- reading the files -----------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def service(name: str) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services[name]


class MissingVariable(LookupError):
    pass


_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_]\w*))"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: ``$$``, ``$V``, ``${V}``, ``${V:-d}``, ``${V-d}``,
    ``${V:?e}``, ``${V?e}``."""

    def replace(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg = m["op"] or "", m["arg"] or ""
        # With a colon, an empty value counts as unset.
        unset = name not in env or (op.startswith(":") and env[name] == "")
        if op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op.endswith("-") and unset:
            return arg
        return env.get(name, "")

    return _REFERENCE.sub(replace, value)


def resolved(node: Any, env: Mapping[str, str] = SECRETS) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolved(item, env) for item in node]
    if isinstance(node, dict):
        return {key: resolved(value, env) for key, value in node.items()}
    return node


def environment(name: str) -> dict[str, str]:
    """A service's environment as its container gets it with only the secrets set."""
    env = service(name).get("environment", {})
    assert isinstance(env, dict), f"{name}: write environment as a mapping"
    return {key: str(value) for key, value in resolved(env).items()}


def command(name: str) -> list[str]:
    cmd = resolved(service(name)["command"])
    assert isinstance(cmd, list), f"{name}: write the command as a list (no shell in between)"
    return [str(word) for word in cmd]


def split_command(words: list[str]) -> tuple[list[str], list[str]]:
    """The subcommand path (the words before the first option) and the rest."""
    first_option = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
    return words[:first_option], words[first_option:]


def spec_variables() -> list[str]:
    """The variables SPEC §5.7 names, up to the next heading."""
    section = re.split(r"\n#+ ", SPEC.read_text().split("### 5.7", 1)[1], maxsplit=1)[0]
    return sorted(set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section)))


def healthcheck_code(name: str) -> str:
    """The Python one-liner of a ``CMD python -c CODE`` healthcheck."""
    test = resolved(service(name)["healthcheck"]["test"])
    assert test[:3] == ["CMD", "python", "-c"], f"{name}: {test}"
    return str(test[3])
