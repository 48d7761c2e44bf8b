"""Where a local stack listens. `grassroots run` records its listeners in its home
(``listeners.json``: a listener's name -> its base URL), and the commands that talk to the stack
over HTTP (``demo``, ``send-webhook``) read them from there: a stack started on other ports is
found from its directory (or with ``--home``) like one on the defaults. One more listener is one
more name in the record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker.settings import ConfigError

LISTENERS_FILE = "listeners.json"
# The webhook's listener, the ops API's and console's, Flower's.
RECEIVER, OPS, FLOWER = "receiver", "ops", "flower"
# Where `grassroots run` listens unless told otherwise (SPEC §5.6).
DEFAULTS = {
    RECEIVER: "http://127.0.0.1:8000",
    OPS: "http://127.0.0.1:8001",
    FLOWER: "http://127.0.0.1:5555",
}
WEBHOOK_PATH = "/webhooks/clever"


def base_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches a listener bound to ``host:port`` at: a wildcard
    address is reached on loopback."""
    if host in ("", "0.0.0.0"):  # noqa: S104 (compared, not bound to)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def record(home: Path, listeners: Mapping[str, str]) -> Path:
    """Write the stack's listeners into its home, whole or not at all (a command reading it
    meanwhile sees the old record or the new one)."""
    path = home / LISTENERS_FILE
    partial = path.with_name(f".{LISTENERS_FILE}.{os.getpid()}")
    partial.write_text(json.dumps(dict(listeners), indent=2) + "\n")
    partial.replace(path)
    return path


@dataclass(frozen=True)
class Found:
    url: str
    # Where the URL came from, for a message about a stack that does not answer there.
    source: str


def find(home: Path, name: str) -> Found:
    """The base URL of a listener of the stack at ``home``: as `grassroots run` recorded it, or
    the default when no run has recorded one there."""
    path = home.absolute() / LISTENERS_FILE
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return Found(DEFAULTS[name], f"the default: no {path}")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}): remove it, or pass --url") from exc
    url = recorded.get(name) if isinstance(recorded, dict) else None
    if not isinstance(url, str):
        return Found(DEFAULTS[name], f"the default: {path} names no {name}")
    return Found(url, f"recorded in {path} by `grassroots run`")


def recorded(home: Path, name: str) -> str | None:
    """The URL `grassroots run` recorded for a listener, or None where no run recorded one (or
    the record cannot be read: the caller has its own fallback)."""
    try:
        found = find(home, name)
    except ConfigError:
        return None
    return None if found.source.startswith("the default") else found.url


def webhook_url(home: Path, url: str | None) -> Found:
    """Where to post a webhook: ``--url`` if given, else the stack's receiver."""
    if url:
        return Found(url, "--url")
    receiver = find(home, RECEIVER)
    return Found(receiver.url + WEBHOOK_PATH, receiver.source)


def not_answering(found: Found, error: Exception) -> str:
    """The one line for a stack that does not answer: the address tried, where it came from, and
    how to point elsewhere."""
    return (
        f"no stack answers at {found.url} ({found.source}; {type(error).__name__}): start one"
        " with `grassroots run`, or point elsewhere with --url URL (or --home DIR)"
    )
