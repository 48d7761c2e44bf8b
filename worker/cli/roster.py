"""The roster and its accounts: ``db upgrade``, ``seed``, ``account show``, ``restore``, ``purge``.

The units of work (``tasks.*``, SQLAlchemy-heavy) and the migrations are imported inside the
commands that run them: `grassroots --help` and the other commands do without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from sqlalchemy.exc import OperationalError

from worker.cli.common import emit, fail, unit_of_work
from worker.settings import get_settings


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations (the only way the schema is made)."""
    # Imported here: Alembic would slow every other command's start.
    from worker.migrate import upgrade

    try:
        upgrade(get_settings().database_url, revision)
    except OperationalError as exc:
        fail(f"database unavailable: {str(exc.orig).strip()}")
    click.echo("database is at the latest schema")


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def seed(file: Path) -> None:
    """Load a roster snapshot (SPEC §5.1). Idempotent; a malformed file is refused whole."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.roster import SnapshotError, load_snapshot
    from tasks.sql import refresh_statistics

    try:
        data = json.loads(file.read_bytes())
    except FileNotFoundError:
        fail(f"{file}: no such file")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{file}: cannot read: {exc}")
    except json.JSONDecodeError as exc:
        fail(f"{file}: not JSON: {exc}")
    with unit_of_work() as session:
        try:
            result = load_snapshot(session, data)
        except SnapshotError as exc:
            fail(f"{file}: {exc}; nothing was loaded")
    with unit_of_work() as session:
        refresh_statistics(session)
    click.echo(f"seeded {file}: {result.describe()}")


@click.group()
def account() -> None:
    """Look at accounts."""


@account.command("show")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="Print the SPEC §5.4 JSON view.")
def account_show(account_id: str, as_json: bool) -> None:
    """Show an account by its Clever id or platform id."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.view import account_view

    with unit_of_work(as_json=as_json) as session:
        view = account_view(session, account_id)
    if as_json:
        emit(view)
        return
    click.echo(f"{view['id']}  {view['kind']}  {view['status']}  roles={','.join(view['roles'])}")
    click.echo(
        f"  district: {view['district'] or '-'}  district reports: {view['district_reports']}"
    )
    for c in view["classes"]:
        click.echo(f"  class {c['id']}  {'district' if c['district_synced'] else 'independent'}")
    for key in ("goals", "assignments"):
        for item in view[key]:
            click.echo(f"  {key[:-1]} {item['id']} (class {item['class']})")
    click.echo(f"  coaches: {', '.join(view['coaches']) or '-'}")
    click.echo(f"  students: {', '.join(view['students']) or '-'}")
    click.echo(f"  progress: {len(view['progress'])} skills")


@click.command()
@click.argument("subject_id")
def restore(subject_id: str) -> None:
    """Bring back an account or a district converted within the retention window."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks.conversion import restore as restore_subject

    with unit_of_work() as session:
        result = restore_subject(
            session,
            subject_id,
            trigger="cli:restore",
            retention_days=get_settings().retention_days,
        )
    if result.entries == 0:
        click.echo(f"{subject_id}: nothing to restore")
    else:
        click.echo(
            f"restored {subject_id}: {result.entries} journal entries, "
            f"{result.links_restored} links, {len(result.accounts)} accounts"
        )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def purge(as_json: bool) -> None:
    """Hard-delete what conversions removed more than RETENTION_DAYS ago, and strip the
    personal data kept that long: final events' payloads, resolved dead letters, audit details."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks import retention

    with unit_of_work() as session:
        purged = retention.purge(session, retention_days=get_settings().retention_days)
    counts = purged.as_dict()
    if as_json:
        emit(counts)
    else:
        click.echo(
            "purged " + ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in counts.items())
        )
