"""``grassroots``: the command line (SPEC §5.6). Exit 0 on success, 1 on an error (one line on
stderr), 2 on misuse."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from worker.db import session_scope
from worker.settings import ConfigError, get_settings

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> NoReturn:
    click.echo(f"grassroots: {message}", err=True)
    sys.exit(1)


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """A session scope whose failures end the command with a one-line message."""
    from tasks.errors import GrassrootsError

    try:
        with session_scope() as session:
            yield session
    except GrassrootsError as exc:
        fail(str(exc))
    except OperationalError as exc:
        fail(f"database unavailable: {exc.orig.__class__.__name__}: {str(exc.orig).strip()}")
    except SQLAlchemyError as exc:
        fail(f"database error: {exc.__class__.__name__}")
    except ConfigError as exc:
        fail(str(exc))


def emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """grassroots: converts district accounts to grassroots accounts when they leave the
    district program."""
    try:
        get_settings()
    except ConfigError as exc:
        fail(str(exc))


# --- database --------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations (the only way the schema is made)."""
    from worker.migrate import upgrade

    try:
        upgrade(get_settings().database_url, revision)
    except OperationalError as exc:
        fail(f"database unavailable: {str(exc.orig).strip()}")
    click.echo("database is at the latest schema")


# --- roster ----------------------------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def seed(file: Path) -> None:
    """Load a roster snapshot (SPEC §5.1). Idempotent; a malformed file is refused whole."""
    from tasks.roster import SnapshotError, load_snapshot

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
    counts = ", ".join(f"{v} {k}" for k, v in result.as_dict().items())
    click.echo(f"seeded {file}: {counts}")


# --- accounts --------------------------------------------------------------------------------


@main.group()
def account() -> None:
    """Look at accounts."""


@account.command("show")
@click.argument("account_id")
@click.option("--json", "as_json", is_flag=True, help="Print the SPEC §5.4 JSON view.")
def account_show(account_id: str, as_json: bool) -> None:
    """Show an account by its Clever id or platform id."""
    from tasks.view import account_view

    with unit_of_work() as session:
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


# --- districts -------------------------------------------------------------------------------


@main.group()
def district() -> None:
    """District exits."""


@district.command("preview")
@click.argument("district_id")
@click.option("--json", "as_json", is_flag=True)
def district_preview(district_id: str, as_json: bool) -> None:
    """What an exit of the district would change. Changes nothing."""
    from tasks.view import preview_exit

    with unit_of_work() as session:
        preview = preview_exit(session, district_id)
    if as_json:
        emit(preview)
        return
    click.echo(
        f"district {preview['district']} ({preview['status']}), policy "
        f"admin_removal={preview['policy']['admin_removal']}"
    )
    click.echo(f"  accounts converted: {preview['accounts']}")
    for role, c in preview["roles"].items():
        click.echo(
            f"    {role}: {c['accounts']} ({c['converted']} converted, {c['removed']} removed)"
        )
    for key in (
        "classes_removed",
        "enrollments_removed",
        "teacher_links_removed",
        "goals_removed",
        "assignments_removed",
        "report_grants_revoked",
    ):
        click.echo(f"  {key.replace('_', ' ')}: {preview[key]}")


@district.command("exit")
@click.argument("district_id")
@click.option("--wait", is_flag=True, help="Wait until the exit is complete.")
def district_exit(district_id: str, wait: bool) -> None:
    """Exit a district from the program (contract end): convert every account."""
    from tasks.conversion import run_district_exit

    with unit_of_work() as session:
        out = run_district_exit(session, district_id, trigger="cli:district-exit")
    click.echo(
        f"district {district_id} exited: "
        + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in out.as_dict().items())
    )


# --- restore ---------------------------------------------------------------------------------


@main.command()
@click.argument("subject_id")
def restore(subject_id: str) -> None:
    """Bring back an account or a district converted within the retention window."""
    from tasks.conversion import restore as restore_subject

    settings = get_settings()
    with unit_of_work() as session:
        result = restore_subject(
            session, subject_id, trigger="cli:restore", retention_days=settings.retention_days
        )
    if result.entries == 0:
        click.echo(f"{subject_id}: nothing to restore")
    else:
        click.echo(
            f"restored {subject_id}: {result.entries} journal entries, "
            f"{result.links_restored} links, {len(result.accounts)} accounts"
        )


@main.command()
def purge() -> None:
    """Hard-delete what conversions removed more than RETENTION_DAYS ago."""
    from tasks.conversion import purge as purge_expired

    with unit_of_work() as session:
        n = purge_expired(session, retention_days=get_settings().retention_days)
    click.echo(f"purged {n} journal entries")
