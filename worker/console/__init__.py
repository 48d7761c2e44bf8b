"""The operators' console (SPEC §5.9): server-rendered pages under ``/console/``.

Each page is a route (``worker.console.pages``), one function of ``tasks.pages`` that returns
plain data, and a template; every change is a ``POST`` through the operator actions the command
line and the ops API use (``worker.services``), then a redirect (POST, redirect, GET).
"""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).parent / "static"
TEMPLATES = Path(__file__).parent / "templates"
