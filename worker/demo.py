"""``grassroots demo``: a newcomer's first ten minutes, against a stack started by
``grassroots run``. Seeds the example district shipped with the package, sends two signed roster
events through the receiver, and shows the accounts they touched before and after.

Its ``users.deleted`` is a roster-absence removal like any other: it counts against the district's
removal brake (REMOVAL_BRAKE_PERCENT in 24 h, at least one a day), which in a 6-person district it
uses up. The demo does not get around the brake, which is what guards a district against a roster
that suddenly leaves people out: it says where the brake stands when it is done."""

from __future__ import annotations

import json
import time
import uuid
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import click
import httpx

from models import EventStatus, utcnow
from tasks.brake import allowance
from tasks.roster import load_snapshot
from tasks.status import event_statuses
from tasks.view import account_view
from worker.db import session_scope
from worker.listeners import Found, not_answering
from worker.settings import get_settings
from worker.signing import signed_headers

DISTRICT = "5b2a6f0c8e9d7a0011223344"
STEVE = "58c81dcea3627927150003ed"  # a student
RIVERA = "5f8e2c1a9b7d4e0012ab0002"  # a district admin who also teaches
PEOPLE = {STEVE: "Steve (student)", RIVERA: "Rivera (admin and teacher)"}


class DemoError(Exception):
    """The demo cannot go on: one line, as every command fails."""


def example_roster() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        resources.files("worker").joinpath("demo_data/example-isd.json").read_text()
    )
    return data


def account_line(view: dict[str, Any]) -> str:
    """An account view (``tasks.view.account_view``) in one line of the demo's output."""
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
            click.echo(f"  {who:<28} {account_line(account_view(session, account_id))}")


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


def brake_note(steve_event: str, status: str) -> str:
    """Where the removal brake stands in the demo's district, now that Steve's removal was
    ``status``."""
    percent = get_settings().removal_brake_percent
    with session_scope() as session:
        left = allowance(session, DISTRICT, percent=percent, now=utcnow())
    rule = f"REMOVAL_BRAKE_PERCENT={percent:g}% of its accounts in 24 h, at least one a day"
    if status == EventStatus.HELD:
        return (
            f"Steve's removal was held by the removal brake: this district's allowance ({rule})"
            f" is used, by an earlier demo most likely. `grassroots held release {steve_event}`"
            f" applies it; `grassroots held discard {steve_event}` drops it."
        )
    if left > 0:
        more = f"{left} more removal{'' if left == 1 else 's'}"
        return f"The removal brake ({rule}) still allows {more} in this district today."
    return (
        f"The removal brake ({rule}) now allows no more removals in this district until those"
        " of the last 24 h age out: a further users.deleted there is held until an operator"
        " releases or discards it (`grassroots held list`)."
    )


def _check_answering(target: Found) -> None:
    """Before anything is seeded: the receiver answers (any answer to its /healthz will do)."""
    parts = urlsplit(target.url)
    try:
        httpx.get(f"{parts.scheme}://{parts.netloc}/healthz", timeout=10)
    except httpx.TransportError as exc:
        raise DemoError(not_answering(target, exc)) from exc


def _send(target: Found, secret: str, event: dict[str, Any]) -> None:
    body = json.dumps(event).encode()
    headers = {"content-type": "application/json", **signed_headers(secret, body)}
    try:
        answer = httpx.post(target.url, content=body, headers=headers, timeout=10)
    except httpx.TransportError as exc:
        raise DemoError(not_answering(target, exc)) from exc
    if answer.status_code != 202:
        raise DemoError(f"{target.url} answered {answer.status_code}: {answer.text}")
    click.echo(f"sent {event['type']:<14} {event['id']} -> {answer.status_code} {answer.text}")


def _processed(sent: list[str], timeout: float) -> dict[str, str]:
    """The final statuses of the events sent, once the workers are done with them."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            states = event_statuses(session, sent)
        if all(states.get(e) not in (None, *EventStatus.in_flight()) for e in sent):
            return states
        if time.monotonic() > deadline:
            raise DemoError(
                f"events still waiting after {timeout:.0f}s ({states}): is a worker running?"
            )
        time.sleep(0.3)


def run_demo(target: Found, secret: str, timeout: float = 60) -> None:
    """Against the stack whose receiver takes webhooks at ``target``, signing with ``secret``."""
    _check_answering(target)
    with session_scope() as session:
        loaded = load_snapshot(session, example_roster())
    click.echo(f"seeded the example district (idempotent): {loaded.describe()}")
    show("before")
    sent = []
    for event in events(uuid.uuid4().hex[:8]):
        _send(target, secret, event)
        sent.append(event["id"])
    states = _processed(sent, timeout)
    click.echo("processed: " + ", ".join(f"{e} {states[e]}" for e in sent))
    show("after")
    steve = states[sent[0]]
    if steve == EventStatus.DONE:
        click.echo(
            "Steve left the roster: grassroots, out of district classes, still in the math club"
            " with all his progress."
        )
    elif steve == EventStatus.IGNORED:
        click.echo("Steve was a grassroots account already (an earlier demo): nothing to remove.")
    click.echo("Rivera lost the admin role: still a district teacher, district reports denied.")
    click.echo(brake_note(sent[0], steve))
    if steve == EventStatus.DONE:
        click.echo(f"Try: grassroots restore {STEVE}")
