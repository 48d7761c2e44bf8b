"""A command run to its end with its wall time, exit status and its own peak memory: how
``sync.py`` times each `grassroots sync` (and its seed)."""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.clever_server import rss_mb

# How often a running command's memory is read from /proc (see ``run_measured``).
MEMORY_POLL_S = 0.05


@dataclass(frozen=True)
class Run:
    seconds: float
    status: int
    peak_rss_mb: float  # VmHWM, the last read: the process's own high-water mark
    rss_max_mb: float  # the largest VmRSS of the samples
    samples: int  # how many times the memory was read
    bench_rss_mb: float  # this process's, when it started the command
    stdout: str
    stderr: str


def memory_kib(pid: int) -> tuple[int, int] | None:
    """VmHWM and VmRSS of a running process, in KiB; None once it has exited (a zombie has no
    address space left, so no Vm lines) or is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            found[name] = int(value.split()[0])
    if len(found) < 2:
        return None
    return found["VmHWM"], found["VmRSS"]


def run_measured(argv: list[str], env: dict[str, str], timeout: float) -> Run:
    """A command to its end: wall seconds, exit status, and its own peak memory. Killed after
    ``timeout`` seconds: a sync that hangs must not hang the benchmark.

    The peak is VmHWM from /proc/PID/status, read every ``MEMORY_POLL_S`` while the command runs
    and kept as last read (a zombie has none). Not ``ru_maxrss`` (``os.wait4``, or
    ``RUSAGE_CHILDREN``): on Linux a process's ru_maxrss survives fork and exec, as the larger of
    its own and that of the address space it had before (the kernel keeps it in the process's
    signal struct), so a child forked from a larger parent reports the parent's peak (594 MB for
    a sync of about 250 MB when this process held the district). VmHWM belongs to the address
    space, which exec replaces: it is the command's own. ``Popen`` returns once the exec has
    happened, so every read is of the command, not of this process's copy before it. What the
    command adds in its last ``MEMORY_POLL_S`` before exiting is not seen."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        bench_rss = rss_mb()
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        deadline = started + timeout
        peak_kib = rss_max_kib = samples = 0
        try:
            while True:
                memory = memory_kib(proc.pid)  # while the pid is not reaped
                if memory is not None:
                    peak_kib, rss_kib = memory
                    rss_max_kib = max(rss_max_kib, rss_kib)
                    samples += 1
                if time.monotonic() > deadline:
                    proc.kill()
                try:  # returns as soon as the command ends: its time is not rounded up
                    proc.wait(MEMORY_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        return Run(
            seconds,
            proc.returncode,
            peak_kib / 1024,
            rss_max_kib / 1024,
            samples,
            bench_rss,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )
