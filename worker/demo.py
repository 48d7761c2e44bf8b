"""``grassroots demo``: a newcomer's first ten minutes, against a stack started by
``grassroots run``. Seeds the example district shipped with the package, sends two signed roster
events through the receiver, and shows the accounts they touched before and after."""

from __future__ import annotations

import json
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import click
import httpx

from tasks.roster import load_snapshot
from tasks.view import account_view
from worker.db import session_scope
from worker.settings import get_settings
from worker.signing import signed_headers

DISTRICT = "5b2a6f0c8e9d7a0011223344"
STEVE = "58c81dcea3627927150003ed"  # a student
RIVERA = "5f8e2c1a9b7d4e0012ab0002"  # a district admin who also teaches
PEOPLE = {STEVE: "Steve (student)", RIVERA: "Rivera (admin and teacher)"}


class DemoError(click.ClickException):
    pass


def example_roster() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        resources.files("worker").joinpath("demo_data/example-isd.json").read_text()
    )
    return data


def webhook_secret() -> str:
    secrets = get_settings().webhook_secrets
    if secrets:
        return secrets[0]
    kept = Path("var") / "webhook-secret"
    if kept.exists():
        return kept.read_text().strip()
    raise DemoError("no webhook secret: set WEBHOOK_SECRETS, or run this beside `grassroots run`")


def describe(view: dict[str, Any]) -> str:
    classes = ", ".join(
        f"{c['id'][-4:] if c['district_synced'] else c['id']}" for c in view["classes"]
    )
    return (
        f"{view['kind']:<10} roles={','.join(view['roles']):<14} "
        f"district reports={view['district_reports']:<7} classes=[{classes}] "
        f"coaches={len(view['coaches'])} skills={len(view['progress'])}"
    )


def show(title: str) -> None:
    click.secho(title, bold=True)
    with session_scope() as session:
        for account_id, who in PEOPLE.items():
            click.echo(f"  {who:<28} {describe(account_view(session, account_id))}")


def events(run: str) -> list[dict[str, Any]]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return [
        {
            "id": f"demo-{run}-1",
            "type": "users.deleted",
            "created": now,
            "data": {"object": {"id": STEVE, "district": DISTRICT, "roles": {"student": {}}}},
        },
        {
            "id": f"demo-{run}-2",
            "type": "users.updated",
            "created": now,
            "data": {
                "object": {"id": RIVERA, "district": DISTRICT, "roles": {"teacher": {}}},
                "previous_attributes": {"roles": {"teacher": {}, "district_admin": {}}},
            },
        },
    ]


def run_demo(url: str, timeout: float = 60) -> None:
    secret = webhook_secret()
    with session_scope() as session:
        load_snapshot(session, example_roster())
    click.echo("seeded the example district (idempotent): 6 people, 3 sections, 2 clubs")
    show("before")
    run = uuid.uuid4().hex[:8]
    sent = []
    for event in events(run):
        body = json.dumps(event).encode()
        headers = {"content-type": "application/json", **signed_headers(secret, body)}
        try:
            answer = httpx.post(url, content=body, headers=headers, timeout=10)
        except httpx.HTTPError as exc:
            raise DemoError(
                f"{url} is not answering ({type(exc).__name__}): start the stack"
                " with `grassroots run` first"
            ) from exc
        if answer.status_code != 202:
            raise DemoError(f"{url} answered {answer.status_code}: {answer.text}")
        click.echo(f"sent {event['type']:<14} {event['id']} -> {answer.status_code} {answer.text}")
        sent.append(event["id"])
    deadline = time.monotonic() + timeout
    from sqlalchemy import select

    from models import RosterEvent

    while True:
        with session_scope() as session:
            states = dict(
                session.execute(
                    select(RosterEvent.id, RosterEvent.status).where(RosterEvent.id.in_(sent))
                )
                .tuples()
                .all()
            )
        if all(states.get(e) not in (None, "accepted", "processing") for e in sent):
            break
        if time.monotonic() > deadline:
            raise DemoError(
                f"events still waiting after {timeout:.0f}s ({states}): is a worker running?"
            )
        time.sleep(0.3)
    click.echo("processed: " + ", ".join(f"{e} {states[e]}" for e in sent))
    show("after")
    click.echo(
        "Steve left the roster: grassroots, out of district classes, still in the math club with"
        " all his progress.\nRivera lost the admin role: still a district teacher, district"
        " reports denied.\nTry: grassroots restore " + STEVE
    )
