"""Operators as people (SPEC §5.5, §5.6 ``operator …``): the command line, hashed tokens, the
operator's token as the ops API's bearer, viewers who may only read, the audit by name, and the
console's session rules (``tasks.operators``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import AuditRecord, ConsoleSession, Operator, OperatorRole, RosterEvent, utcnow
from tasks import operators
from tasks.errors import NotFound, Refused
from tests.support.app_env import CLOSED_BROKER, Configure, assert_error
from tests.support.cli import grassroots
from tests.support.stack import OPS_TOKEN
from worker import db
from worker.api import app

TOKEN_LINE = re.compile(r"[0-9a-f]{16}\.[A-Za-z0-9_-]{40,}\n")


def test_operator_add_prints_the_token_alone_and_keeps_only_an_argon2_hash(
    tmp_path: Path, database_url: str
) -> None:
    added = grassroots(tmp_path, "operator", "add", "ada", "--role", "operator",
                       DATABASE_URL=database_url)  # fmt: skip

    assert added.returncode == 0, added.stderr
    assert TOKEN_LINE.fullmatch(added.stdout)
    token = added.stdout.strip()
    engine = db.make_engine(database_url)
    with Session(engine) as session:
        row = session.scalars(select(Operator)).one()
        assert (row.name, row.role) == ("ada", "operator")
        assert row.token_hash.startswith("$argon2id$")
        assert token not in row.token_hash and token.split(".")[1] not in row.token_hash
    engine.dispose()


def test_operator_list_and_remove(tmp_path: Path, database_url: str) -> None:
    env = {"DATABASE_URL": database_url}
    assert grassroots(tmp_path, "operator", "add", "vic", "--role", "viewer", **env).returncode == 0
    assert (
        grassroots(tmp_path, "operator", "add", "ada", "--role", "operator", **env).returncode == 0
    )

    listed = grassroots(tmp_path, "operator", "list", "--json", **env)
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["role"], r["last_seen_at"]) for r in rows] == [
        ("ada", "operator", None),
        ("vic", "viewer", None),
    ]
    assert all(set(r) == {"name", "role", "created_at", "last_seen_at"} for r in rows)

    removed = grassroots(tmp_path, "operator", "remove", "vic", **env)
    assert removed.returncode == 0, removed.stderr
    after = json.loads(grassroots(tmp_path, "operator", "list", "--json", **env).stdout)
    assert [r["name"] for r in after] == ["ada"]


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (("operator", "add", "ada", "--role", "operator"), 1),  # a second ada
        (("operator", "add", "bob", "--role", "admin"), 2),
        (("operator", "add", "bob"), 2),
        (("operator", "add", "has space", "--role", "viewer"), 2),
        (("operator", "remove", "nobody"), 1),
    ],
    ids=["duplicate", "bad-role", "no-role", "bad-name", "unknown"],
)
def test_operator_commands_refuse_misuse_and_errors(
    tmp_path: Path, database_url: str, args: tuple[str, ...], status: int
) -> None:
    env = {"DATABASE_URL": database_url}
    assert (
        grassroots(tmp_path, "operator", "add", "ada", "--role", "operator", **env).returncode == 0
    )

    result = grassroots(tmp_path, *args, **env)

    assert result.returncode == status
    assert result.stdout == ""
    assert result.stderr.strip()


# --------------------------------------------------------------------------------------------
# The rules, over a session


def test_a_token_signs_in_only_with_its_own_name(session: Session) -> None:
    token = operators.add(session, "ada", OperatorRole.OPERATOR, by="test")
    other = operators.add(session, "vic", OperatorRole.VIEWER, by="test")

    assert operators.sign_in(session, "ada", token) is not None
    assert operators.sign_in(session, "vic", token) is None
    assert operators.sign_in(session, "ada", other) is None
    assert operators.sign_in(session, "nobody", token) is None
    assert operators.by_token(session, token) == operators.Identity("ada", OperatorRole.OPERATOR)
    assert operators.by_token(session, token + "x") is None


def test_adding_a_second_operator_of_the_same_name_is_refused(session: Session) -> None:
    operators.add(session, "ada", OperatorRole.OPERATOR, by="test")
    with pytest.raises(Refused):
        operators.add(session, "ada", OperatorRole.VIEWER, by="test")
    assert session.scalar(select(func.count()).select_from(Operator)) == 1


def test_a_session_ends_after_twelve_hours_idle_and_at_sign_out(session: Session) -> None:
    token = operators.add(session, "ada", OperatorRole.OPERATOR, by="test")
    start = utcnow()
    opened = operators.sign_in(session, "ada", token, now=start)
    assert opened is not None

    later = start + timedelta(hours=11, minutes=59)
    signed = operators.signed_in(session, opened.secret, now=later)
    assert signed is not None and signed.identity.name == "ada"
    assert signed.csrf_matches(opened.csrf) and not signed.csrf_matches("forged")
    # Idle counts from the last request, not from the sign-in.
    assert operators.signed_in(session, opened.secret, now=later + timedelta(hours=11)) is not None
    assert (
        operators.signed_in(session, opened.secret, now=later + timedelta(hours=23, minutes=1))
        is None
    )
    assert session.scalar(select(func.count()).select_from(ConsoleSession)) == 0

    again = operators.sign_in(session, "ada", token)
    assert again is not None
    operators.sign_out(session, again.secret)
    assert operators.signed_in(session, again.secret) is None


def test_a_page_refreshing_itself_does_not_keep_a_session_open(session: Session) -> None:
    token = operators.add(session, "ada", OperatorRole.OPERATOR, by="test")
    start = utcnow()
    opened = operators.sign_in(session, "ada", token, now=start)
    assert opened is not None

    for hours in range(1, 12):
        refresh = start + timedelta(hours=hours)
        assert operators.signed_in(session, opened.secret, now=refresh, active=False)
    late = start + timedelta(hours=12, minutes=1)
    assert operators.signed_in(session, opened.secret, now=late, active=False) is None


def test_removing_an_operator_ends_its_token_and_sessions_at_once(session: Session) -> None:
    token = operators.add(session, "ada", OperatorRole.OPERATOR, by="test")
    opened = operators.sign_in(session, "ada", token)
    assert opened is not None and operators.by_token(session, token) is not None

    operators.remove(session, "ada", by="test")

    assert operators.by_token(session, token) is None
    assert operators.signed_in(session, opened.secret) is None
    with pytest.raises(NotFound):
        operators.remove(session, "ada", by="test")


def test_the_audit_names_the_operator_who_did_it() -> None:
    ada = operators.Identity("ada", OperatorRole.OPERATOR)
    assert operators.who(ada.trigger("console", "replay")) == "ada"
    assert operators.who(operators.AUTOMATION.trigger("ops", "replay")) == "ops"
    assert operators.who("cli:replay") == "cli"


def test_repeated_failed_sign_ins_are_slowed_per_key_and_forgotten_on_success() -> None:
    throttle = operators.Throttle(free=3, cap=60, window=900, keys=2)
    for n in range(3):
        assert throttle.wait("name:ada", "ip:1", now=n) == 0
        throttle.failed("name:ada", "ip:1", now=n)
    # The fourth failure in a row waits a second, the next two, then four…
    throttle.failed("name:ada", "ip:1", now=3)
    assert throttle.wait("name:ada", now=3) == pytest.approx(2)
    assert throttle.wait("ip:1", now=4) == pytest.approx(1)
    assert throttle.wait("name:other", now=3) == 0
    # Long after the last failure, the count starts again.
    assert throttle.wait("name:ada", now=3 + 901) == 0
    throttle.succeeded("name:ada")
    assert throttle.wait("name:ada", now=4) == 0
    # Bounded: the least recently failed key is forgotten first.
    throttle.failed("a", now=10)
    throttle.failed("b", now=11)
    assert len(throttle._failures) == 2 and "ip:1" not in throttle._failures


# --------------------------------------------------------------------------------------------
# An operator's token on the ops API


@pytest.fixture
def api(configure: Configure, database_url: str) -> Iterator[TestClient]:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, OPS_TOKEN=OPS_TOKEN)
    with TestClient(app) as client:
        yield client


def _operator(name: str, role: OperatorRole) -> dict[str, str]:
    with db.session_scope() as session:
        token = operators.add(session, name, role, by="test")
    return {"Authorization": f"Bearer {token}"}


def _dead_event(event_id: str) -> None:
    with db.session_scope() as session:
        session.add(
            RosterEvent(id=event_id, type="users.deleted", payload={}, status="dead", attempts=8)
        )


def _audits(action: str) -> list[str]:
    with db.session_scope() as session:
        return list(
            session.scalars(select(AuditRecord.trigger).where(AuditRecord.action == action))
        )


def test_an_operators_token_is_a_bearer_and_its_changes_are_audited_by_name(
    api: TestClient,
) -> None:
    ada = _operator("ada", OperatorRole.OPERATOR)
    _dead_event("evt-1")

    assert api.get("/ops/status", headers=ada).status_code == 200
    replayed = api.post("/ops/events/evt-1/replay", headers=ada)

    assert replayed.status_code == 202, replayed.text
    assert _audits("replay") == ["operator:ada:ops:replay"]
    with db.session_scope() as session:
        seen = session.scalar(select(Operator.last_seen_at).where(Operator.name == "ada"))
    assert seen is not None


def test_the_ops_token_is_still_audited_as_ops(api: TestClient) -> None:
    _dead_event("evt-1")
    response = api.post(
        "/ops/events/evt-1/replay", headers={"Authorization": f"Bearer {OPS_TOKEN}"}
    )
    assert response.status_code == 202
    assert _audits("replay") == ["ops:replay"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/ops/events/evt-1/replay", None),
        ("POST", "/ops/events/evt-1/discard", None),
        ("POST", "/ops/pauses", {"district": None, "until": "2099-01-01"}),
        ("DELETE", "/ops/pauses/1", None),
        ("POST", "/ops/districts/d1/exit", None),
        ("POST", "/ops/districts/d1/exit/resume", None),
        ("POST", "/ops/districts/d1/sync", None),
    ],
)
def test_a_viewers_token_reads_but_every_change_is_403_and_changes_nothing(
    api: TestClient, method: str, path: str, body: dict[str, object] | None
) -> None:
    vic = _operator("vic", OperatorRole.VIEWER)
    _dead_event("evt-1")

    assert api.get("/ops/events", headers=vic).status_code == 200
    response = api.request(method, path, headers=vic, json=body)

    assert_error(response, 403, "forbidden")
    with db.session_scope() as session:
        assert session.get(RosterEvent, "evt-1").status == "dead"  # type: ignore[union-attr]
        assert session.scalar(select(func.count()).select_from(AuditRecord)) == 1  # the add


def test_a_removed_operators_token_is_refused_at_once(api: TestClient) -> None:
    ada = _operator("ada", OperatorRole.OPERATOR)
    assert api.get("/ops/status", headers=ada).status_code == 200
    with db.session_scope() as session:
        operators.remove(session, "ada", by="test")

    assert_error(api.get("/ops/status", headers=ada), 401, "unauthorized")


def test_an_unknown_name_costs_a_hash_verification_like_a_wrong_token(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So the time of the answer does not tell which names exist."""
    operators.add(session, "ada", OperatorRole.OPERATOR, by="test")
    verified: list[str] = []
    real = operators._hasher

    class Counting:
        def hash(self, token: str) -> str:
            return real.hash(token)

        def verify(self, hashed: str, token: str) -> bool:
            verified.append(token)
            return real.verify(hashed, token)

    monkeypatch.setattr(operators, "_hasher", Counting())
    assert operators.sign_in(session, "nobody", "a.wrong-token") is None
    assert operators.sign_in(session, "ada", "b.wrong-token") is None
    assert verified == ["a.wrong-token", "b.wrong-token"]
