"""``grassroots sync``: load each district whole from the Clever Data API and reconcile the
mirror with it (SPEC §5.8).

The sync (``worker.sync``: httpx, and the Celery app it sends through) is imported inside the
command: `grassroots --help` and the other commands do without it.
"""

from __future__ import annotations

import json

import click

from models import SyncStatus
from worker.cli.common import district_tokens, fail, refusals
from worker.db import require_stack
from worker.settings import get_settings


@click.command("sync")
@click.argument("districts", nargs=-1, metavar="[DISTRICT_ID]...")
@click.option("--dry-run", is_flag=True, help="Pull and compare, change nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per district.")
def sync(districts: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Sync districts' rosters from the Clever Data API (default: every district in
    CLEVER_DISTRICT_TOKENS). Exit status 1 if a sync failed."""
    # Imported here: the Clever client (httpx) would slow every command's start.
    from worker import sync as syncing
    from worker.clever import parse_tokens

    settings = get_settings()
    with refusals(as_json=as_json):
        tokens = district_tokens(
            parse_tokens(settings.clever_district_tokens), districts, doing="sync"
        )
        require_stack(settings)
        options = syncing.SyncOptions.from_settings(settings)
        reports = [
            syncing.sync_district(token, options, dry_run=dry_run, trigger="cli")
            for token in tokens
        ]
    for report in reports:
        if as_json:
            click.echo(json.dumps(report.as_dict()))
            continue
        changes = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in report.changes.items())
        if report.status == SyncStatus.FAILED:
            click.echo(f"district {report.district}: sync {report.sync_id} failed: {report.reason}")
        else:
            held = f"; {report.held} removal(s) the brake will hold" if report.held else ""
            click.echo(
                f"district {report.district}: sync {report.sync_id}"
                f"{' (dry run)' if dry_run else ''}: pulled {report.pulled['users']} users,"
                f" {report.pulled['sections']} sections; {changes}{held}"
            )
    failed = [r.district for r in reports if r.status == SyncStatus.FAILED]
    if failed:
        fail(f"{len(failed)} of {len(reports)} sync(s) failed: {', '.join(failed)}")
