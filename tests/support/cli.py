"""The command line as a new user meets it: the installed ``grassroots`` in a shell that exports
none of the application's variables, and what it leaves on disk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.app_env import CLOSED_BROKER
from tests.support.stack import BIN
from worker.settings import ENVIRONMENT_VARIABLES


def no_stack(home: Path) -> str:
    return (
        f"no grassroots stack in {home} (no database there): start one with `grassroots run`,"
        " pass --home, or set DATABASE_URL"
    )


def tree(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def grassroots(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed command in a shell that exports none of the application's variables."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ENVIRONMENT_VARIABLES and not k.startswith("PYTEST")
    }
    return subprocess.run(
        [str(BIN), *args],
        cwd=cwd,
        env={**clean, "BROKER_URL": CLOSED_BROKER, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
