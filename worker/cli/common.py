"""What every command of the command line shares: how it fails (one line on stderr, status 1; for a
command asked for --json, the ops API's error object on stdout too), its unit of work, its JSON
output. Command modules import from here, never from ``worker.cli`` itself."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from tasks.errors import GrassrootsError, NotFound
from worker.db import NoStack, session_scope
from worker.settings import HOME_SECRETS, ConfigError, get_settings

if TYPE_CHECKING:
    from worker.clever import DistrictToken

T = TypeVar("T")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_LEVEL_OPTION = click.option(
    "--loglevel",
    "-l",
    default="info",
    show_default=True,
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
)


def fail(message: str, *, code: str | None = None) -> NoReturn:
    """End the command: one line on stderr, status 1. With ``code`` (the error of a command asked
    for --json), the ops API's error object on stdout as well, for a script that reads stdout."""
    if code is not None:
        click.echo(json.dumps({"error": code, "message": message}))
    click.echo(f"grassroots: {message}", err=True)
    sys.exit(1)


@contextmanager
def refusals(*, as_json: bool = False) -> Iterator[None]:
    """What an operator action raises (no such thing, refused, no database, no stack) ends the
    command with a one-line message (and, for ``as_json``, a JSON error object)."""

    def end(code: str, message: str) -> NoReturn:
        fail(message, code=code if as_json else None)

    try:
        yield
    except NotFound as exc:
        end("not_found", str(exc))
    except GrassrootsError as exc:
        end("refused", str(exc))
    except OperationalError as exc:
        end(
            "database_unavailable",
            f"database unavailable: {exc.orig.__class__.__name__}: {str(exc.orig).strip()}",
        )
    except SQLAlchemyError as exc:
        end("database_error", f"database error: {exc.__class__.__name__}")
    except NoStack as exc:
        end("no_stack", str(exc))
    except ConfigError as exc:
        end("not_configured", str(exc))


@contextmanager
def unit_of_work(*, as_json: bool = False) -> Iterator[Session]:
    """A session scope whose failures end the command as ``refusals`` says."""
    with refusals(as_json=as_json), session_scope() as session:
        yield session


def district_tokens(
    tokens: Sequence[DistrictToken], districts: Sequence[str], *, doing: str
) -> list[DistrictToken]:
    """The tokens of the districts asked for (none asked: every one configured)."""
    if not tokens:
        fail(f"CLEVER_DISTRICT_TOKENS names no district to {doing}")
    unknown = sorted(set(districts) - {t.district_id for t in tokens})
    if unknown:
        raise click.UsageError(f"no token for district {', '.join(unknown)}")
    return [t for t in tokens if not districts or t.district_id in districts]


def emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def show_rows(
    rows: Sequence[T],
    line: Callable[[T], str],
    *,
    empty: str,
    as_json: bool,
    counted: str | None = None,
) -> None:
    """A listing: JSON with ``--json``; otherwise one line a row, where an empty one says so (a
    blank screen says nothing) and, given ``counted``, a last line ``<n> <counted>``."""
    if as_json:
        emit(rows)
        return
    if not rows:
        click.echo(empty)
    for row in rows:
        click.echo(line(row))
    if rows and counted:
        click.echo(f"{len(rows)} {counted}")


def webhook_secret() -> str:
    """The secret to sign with: the first of WEBHOOK_SECRETS, which the command line has filled
    from the stack's home when unset (``settings.home_secrets``)."""
    settings = get_settings()
    if settings.webhook_secrets:
        return settings.webhook_secrets[0]
    kept = settings.home.absolute() / HOME_SECRETS["WEBHOOK_SECRETS"]
    raise ConfigError(
        f"no webhook secret to sign with: WEBHOOK_SECRETS is not set and there is no {kept}:"
        " start a stack with `grassroots run`, pass --home, or set WEBHOOK_SECRETS"
    )
