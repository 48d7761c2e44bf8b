#!/usr/bin/env python3
"""Screenshots of every console page (SPEC §5.9) over the example district, into docs/console/.

Starts `grassroots run` in a throwaway home on spare ports, runs `grassroots demo` against it,
adds a held removal and a pause so those pages show something, makes an operator with
`grassroots operator add`, then signs in with Debian's Chromium through Playwright and saves one
PNG per page (`make screenshots`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "console"
BIN = Path(sys.executable).parent / "grassroots"
CHROMIUM = "/usr/bin/chromium"
DISTRICT = "5b2a6f0c8e9d7a0011223344"
STEVE = "58c81dcea3627927150003ed"
LEO = "58c81dcea3627927150003ef"


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def grassroots(home: Path, *args: str) -> str:
    return subprocess.run(
        [str(BIN), "--home", str(home), *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=home.parent,
    ).stdout


def wait_for(url: str) -> None:
    for _ in range(600):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def leo_leaves(home: Path) -> None:
    """A further removal in the example district today: the brake holds it."""
    data = json.loads((ROOT / "worker" / "demo_data" / "example-isd.json").read_text())
    leo = next(u for u in data["users"] if u["id"] == LEO)
    event = {
        "id": "screenshots-leo-leaves",
        "type": "users.deleted",
        "created": "2026-12-01T10:00:00Z",
        "data": {"object": leo},
    }
    path = home.parent / "leo-leaves.json"
    path.write_text(json.dumps(event))
    grassroots(home, "send-webhook", str(path))


def shoot(page: Page, base: str, name: str, path: str) -> None:
    page.goto(f"{base}{path}")
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
    print(f"docs/console/{name}.png  {path}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "var"
        port, ops, flower = spare_port(), spare_port(), spare_port()
        stack = subprocess.Popen(
            [
                str(BIN),
                "--home",
                str(home),
                "run",
                "--port",
                str(port),
                "--ops-port",
                f"{ops}",
                "--flower-port",
                f"{flower}",
            ],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        )
        # The console is on the ops listener (`run --ops-port`), never on the webhook's.
        base = f"http://127.0.0.1:{ops}"
        try:
            wait_for(f"{base}/healthz")
            grassroots(home, "demo")
            leo_leaves(home)
            grassroots(home, "pause", "add", "--until", "2099-01-04", "--reason", "winter break")
            token = grassroots(home, "operator", "add", "ada", "--role", "operator").strip()
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM)
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                shoot(page, base, "sign-in", "/console/")
                page.get_by_label("Name").fill("ada")
                page.get_by_label("Token").fill(token)
                page.get_by_role("button", name="Sign in").click()
                for name, path in [
                    ("overview", "/console/"),
                    ("events", "/console/events"),
                    ("event", "/console/events/screenshots-leo-leaves"),
                    ("dead-letters", "/console/dead"),
                    ("held", "/console/held"),
                    ("pauses", "/console/pauses"),
                    ("district", f"/console/districts/{DISTRICT}"),
                    ("exit-confirmation", f"/console/districts/{DISTRICT}/exit"),
                    ("account", f"/console/accounts/{STEVE}"),
                    ("audit", "/console/audit"),
                ]:
                    shoot(page, base, name, path)
                browser.close()
        finally:
            os.killpg(stack.pid, signal.SIGINT)
            try:
                stack.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(stack.pid, signal.SIGKILL)
                stack.wait(10)


if __name__ == "__main__":
    main()
