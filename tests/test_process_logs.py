"""A failing test prints the last lines of the log of each process it started
(``tests/support/process_logs.py``, loaded by ``tests/conftest.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FAILING = """
from tests.support.stack import RedisServer


def test_a_stack_test_that_fails(tmp_path):
    with RedisServer(tmp_path):
        raise AssertionError("the stack did not do what was asked")


def test_a_test_that_passes_after_it():
    pass
"""


def test_a_failing_test_prints_the_tail_of_each_process_log_it_started(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(FAILING)
    inner = subprocess.run(
        # Our conftest as a plugin, as the suite loads it; no config of the project's beyond it.
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert inner.returncode == 1, inner.stdout + inner.stderr
    report = inner.stdout
    assert "1 failed, 1 passed" in report
    section = report.split("log of redis-server :", 1)[1]
    assert "last 40 lines" in section.splitlines()[0]
    assert "Ready to accept connections" in section
    # Only the failing test's report carries it.
    assert report.count("log of redis-server :") == 1
