"""Operators as people (SPEC §5.6): ``operator add``, ``operator list``, ``operator remove``.

The rule is ``tasks.operators``; these commands only read their arguments and print.
"""

from __future__ import annotations

import click

from models import OperatorRole
from tasks.errors import InvalidInput
from worker.cli.common import show_rows, unit_of_work

# Made or removed from a shell: the audit log says so.
BY = "cli"


@click.group()
def operator() -> None:
    """The people who use the console and the ops API, each with a token and a role."""


@operator.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice([str(r) for r in OperatorRole]))
def operator_add(name: str, role: str) -> None:
    """Add an operator; print its token, once (only a hash of it is kept)."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks import operators

    try:
        operators.check_name(name)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    with unit_of_work() as session:
        token = operators.add(session, name, OperatorRole(role), by=f"{BY}:operator-add")
    click.echo(token)


@operator.command("list")
@click.option("--json", "as_json", is_flag=True)
def operator_list(as_json: bool) -> None:
    """List the operators, by name."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks import operators

    with unit_of_work(as_json=as_json) as session:
        rows = operators.listed(session)
    show_rows(
        rows,
        lambda r: (
            f"{r['name']:<24} {r['role']:<9} created {r['created_at']}"
            f"  last seen {r['last_seen_at'] or 'never'}"
        ),
        empty="no operators: add one with `grassroots operator add NAME --role operator`",
        as_json=as_json,
    )


@operator.command("remove")
@click.argument("name")
def operator_remove(name: str) -> None:
    """Remove an operator: its token and its console sessions stop working at once."""
    # Imported here: each command loads only the work it runs (CLI start-up).
    from tasks import operators

    with unit_of_work() as session:
        operators.remove(session, name, by=f"{BY}:operator-remove")
    click.echo(f"removed operator {name}")
