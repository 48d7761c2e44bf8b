"""A failing test prints the last lines of the log of every process it started (a stack's
receiver, workers, beat, Redis, Flower, ``grassroots run``…): without them a stack test that fails
under load leaves nothing to diagnose it from.

Helpers that start a process register its log here (``register``); the pytest hooks below add
each registered log's tail to a failing test's report, as a section of its own. A process stays
registered while it runs (a module-scoped Flower serves several tests), and is forgotten at the
next test's start once it has ended. Loaded as a plugin by ``tests/conftest.py``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

TAIL_LINES = 40


@dataclass(frozen=True)
class _Log:
    name: str
    path: Path
    proc: subprocess.Popen[Any]


_LOGS: list[_Log] = []


def register(name: str, path: Path, proc: subprocess.Popen[Any]) -> None:
    """``proc`` writes its output to ``path``: show its tail if the test fails."""
    _LOGS.append(_Log(name, path, proc))


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def tails() -> list[tuple[str, str]]:
    """(title, last lines) of every registered log."""
    return [
        (f"log of {log.name} ({log.path}), last {TAIL_LINES} lines", tail(log.path))
        for log in _LOGS
    ]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _LOGS[:] = [log for log in _LOGS if log.proc.poll() is None]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        report.sections.extend(tails())
    return report
