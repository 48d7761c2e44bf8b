"""``grassroots``: the command line (SPEC §5.6). Exit 0 on success, 1 on an error (one line on
stderr), 2 on misuse.

The commands are thin adapters over the operator actions (``worker.services``), the views
(``tasks.*``) and the processes, one module per responsibility; what they share is in
``worker.cli.common``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from worker.cli import district, events, operators, pauses, poll, processes, roster, sync
from worker.cli.common import fail
from worker.settings import ConfigError, get_settings, home_secrets


class _Main(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        # A setting we cannot use, or no stack where a command looks for its database (NoStack,
        # raised where the engine is made), is one line and status 1 in every command.
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            fail(str(exc))


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    help="The stack's directory, where `grassroots run` keeps its database, generated secrets,"
    " schedule and private redis (overrides GRASSROOTS_HOME; default ./var).",
)
def main(home: Path | None) -> None:
    """grassroots: converts district accounts to grassroots accounts when they leave the
    district program."""
    if home is not None:
        os.environ["GRASSROOTS_HOME"] = str(home)
    get_settings.cache_clear()
    try:
        # The secrets `grassroots run` generated under the home stand in for the variables left
        # unset, for this command and any process it starts.
        os.environ.update(home_secrets(get_settings().home, os.environ))
        get_settings.cache_clear()
        get_settings()
    except ConfigError as exc:
        fail(str(exc))


for command in (
    roster.db,
    roster.seed,
    roster.account,
    roster.restore,
    roster.purge,
    district.district,
    events.events,
    events.held,
    events.status,
    pauses.pause,
    operators.operator,
    processes.serve,
    processes.worker,
    processes.beat,
    processes.flower,
    processes.run,
    processes.demo,
    processes.send_webhook,
    poll.poll,
    sync.sync,
):
    main.add_command(command)
