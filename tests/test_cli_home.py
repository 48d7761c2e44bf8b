"""The stack's home (GRASSROOTS_HOME, ``grassroots --home``): every command finds the database and
the secrets `grassroots run` keeps there, says so plainly when there is no stack, and creates
nothing but through `grassroots run` or `grassroots db upgrade`. Also the command line's JSON
errors and the worker's node name."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from models import Account, RosterEvent
from tasks.roster import load_snapshot
from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.cli import grassroots, no_stack, tree
from tests.support.stack import OPS_TOKEN
from worker import demo, signing
from worker.celery_app import app as celery_app
from worker.cli import main
from worker.db import session_scope
from worker.settings import ENVIRONMENT_VARIABLES, get_settings, load_settings

# The variables that name a stack, or stand in for what it keeps.
STACK_VARIABLES = (
    "GRASSROOTS_HOME",
    "DATABASE_URL",
    "WEBHOOK_SECRETS",
    "OPS_TOKEN",
    "FLOWER_BASIC_AUTH",
)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configure: Configure) -> Path:
    """An empty current directory, with none of the variables that name a stack set."""
    configure(**dict.fromkeys(STACK_VARIABLES), BROKER_URL=CLOSED_BROKER)
    monkeypatch.chdir(tmp_path)
    return Path.cwd()


def invoke(*args: str, **env: str) -> Result:
    # The command line sets GRASSROOTS_HOME (--home) and the home's secrets in its process's
    # environment: CliRunner puts back every variable it is given.
    return CliRunner().invoke(main, list(args), env={**dict.fromkeys(STACK_VARIABLES), **env})


# --- settings ----------------------------------------------------------------------------------


def test_the_home_is_a_setting_of_its_own_and_the_default_database_lives_in_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "GRASSROOTS_HOME" in ENVIRONMENT_VARIABLES
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("GRASSROOTS_HOME", raising=False)
    assert load_settings().home == Path("var")
    assert load_settings().database_url == "sqlite:///var/grassroots.db"
    monkeypatch.setenv("GRASSROOTS_HOME", "/srv/stack")
    assert load_settings().database_url == "sqlite:////srv/stack/grassroots.db"
    assert load_settings().home_database == Path("/srv/stack/grassroots.db")
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/grassroots")
    assert load_settings().home_database is None


# --- no stack here -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["account", "show", "x"],
        ["district", "preview", "x"],
        ["district", "exit", "x"],
        ["events", "list"],
        ["events", "show", "x"],
        ["events", "replay", "x"],
        ["held", "list"],
        ["held", "discard", "x"],
        ["restore", "x"],
        ["purge"],
        ["demo"],
    ],
    ids=" ".join,
)
def test_a_command_needing_the_database_where_there_is_no_stack_says_so_and_makes_nothing(
    here: Path, args: list[str]
) -> None:
    result = invoke(*args)

    assert result.exit_code == 1, result.output
    assert result.stderr == f"grassroots: {no_stack(here / 'var')}\n"
    assert tree(here) == []


def test_no_stack_in_a_real_process_either_and_json_commands_say_it_in_json(
    tmp_path: Path,
) -> None:
    result = grassroots(tmp_path, "status", "--json")

    assert result.returncode == 1
    assert result.stderr == f"grassroots: {no_stack(tmp_path.resolve() / 'var')}\n"
    assert json.loads(result.stdout) == {
        "error": "no_stack",
        "message": no_stack(tmp_path.resolve() / "var"),
    }
    assert tree(tmp_path) == []


def test_an_empty_database_file_left_in_the_home_is_no_stack(here: Path) -> None:
    # What earlier versions left wherever a command was run: an empty SQLite file.
    (here / "var").mkdir()
    with sqlite3.connect(here / "var" / "grassroots.db") as conn:
        conn.execute("PRAGMA journal_mode=WAL")

    result = invoke("events", "list")

    assert result.exit_code == 1
    assert result.stderr == f"grassroots: {no_stack(here / 'var')}\n"


def test_db_upgrade_makes_the_home_and_every_command_then_finds_it(
    here: Path, configure: Configure
) -> None:
    made = invoke("--home", "stacks/one", "db", "upgrade")
    assert made.exit_code == 0, made.output
    assert (here / "stacks" / "one" / "grassroots.db").is_file()

    # --home over GRASSROOTS_HOME, which names a directory with no stack.
    found = invoke("--home", "stacks/one", "status", "--json", GRASSROOTS_HOME="nowhere")
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["pending"] == 0
    configure()  # a new process would make its engine anew
    by_variable = invoke("events", "list", "--json", GRASSROOTS_HOME="stacks/one")
    assert by_variable.exit_code == 0, by_variable.output
    assert json.loads(by_variable.stdout) == []
    assert [p for p in tree(here) if not p.startswith("stacks/one/")] == ["stacks", "stacks/one"]


# --- the home's secrets ------------------------------------------------------------------------


@pytest.fixture
def posted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What ``send-webhook`` posts, answered 202, with the ops token its settings hold."""
    sent: list[dict[str, Any]] = []

    def post(url: str, *, content: bytes, headers: dict[str, str], timeout: float) -> Any:
        sent.append(
            {
                "url": url,
                "body": content,
                "headers": headers,
                "ops_token": get_settings().ops_token,
            }
        )
        return httpx.Response(202, text='{"status": "accepted"}')

    monkeypatch.setattr(httpx, "post", post)
    return sent


def keep(home: Path, name: str, value: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / name).write_text(value + "\n")


def test_send_webhook_signs_with_the_secret_the_home_keeps(
    here: Path, posted: list[dict[str, Any]]
) -> None:
    secret = signing.generate_secret()
    keep(here / "var", "webhook-secret", secret)
    keep(here / "var", "ops-token", OPS_TOKEN)
    (here / "event.json").write_text('{"id": "e1", "type": "users.updated"}')

    result = invoke("send-webhook", "event.json")

    assert result.exit_code == 0, result.output
    (sent,) = posted
    assert signing.verify([secret], sent["headers"], sent["body"])
    assert sent["ops_token"] == OPS_TOKEN
    assert secret not in result.output


def test_the_environment_wins_over_the_home_and_home_finds_another_directory(
    here: Path, posted: list[dict[str, Any]]
) -> None:
    exported, elsewhere = signing.generate_secret(), signing.generate_secret()
    keep(here / "var", "webhook-secret", signing.generate_secret())
    keep(here / "elsewhere", "webhook-secret", elsewhere)
    (here / "event.json").write_text("{}")

    assert invoke("send-webhook", "event.json", WEBHOOK_SECRETS=exported).exit_code == 0
    assert invoke("--home", "elsewhere", "send-webhook", "event.json").exit_code == 0

    assert signing.verify([exported], posted[0]["headers"], posted[0]["body"])
    assert signing.verify([elsewhere], posted[1]["headers"], posted[1]["body"])


def test_send_webhook_without_a_secret_anywhere_says_where_it_looked(
    here: Path, posted: list[dict[str, Any]]
) -> None:
    (here / "event.json").write_text("{}")

    result = invoke("send-webhook", "event.json")

    assert result.exit_code == 1
    assert result.stderr == (
        "grassroots: no webhook secret to sign with: WEBHOOK_SECRETS is not set and there is no"
        f" {here / 'var' / 'webhook-secret'}: start a stack with `grassroots run`, pass --home,"
        " or set WEBHOOK_SECRETS\n"
    )
    assert posted == []
    assert tree(here) == ["event.json"]


# --- where the stack listens ------------------------------------------------------------------


def test_send_webhook_posts_where_the_stack_in_the_home_recorded_its_receiver(
    here: Path, posted: list[dict[str, Any]]
) -> None:
    keep(here / "var", "webhook-secret", signing.generate_secret())
    keep(here / "var", "listeners.json", json.dumps({"receiver": "http://127.0.0.1:8123"}))
    keep(here / "other", "webhook-secret", signing.generate_secret())
    (here / "event.json").write_text("{}")

    assert invoke("send-webhook", "event.json").exit_code == 0
    assert invoke("--home", "other", "send-webhook", "event.json").exit_code == 0
    assert invoke("send-webhook", "event.json", "--url", "http://h:1/x").exit_code == 0

    assert [p["url"] for p in posted] == [
        "http://127.0.0.1:8123/webhooks/clever",
        "http://127.0.0.1:8000/webhooks/clever",  # no run recorded one there: the default
        "http://h:1/x",
    ]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_stack_that_does_not_answer_is_named_with_its_address_and_how_to_point_elsewhere(
    here: Path,
) -> None:
    home = here / "var"
    keep(home, "webhook-secret", signing.generate_secret())
    port = closed_port()
    keep(home, "listeners.json", json.dumps({"receiver": f"http://127.0.0.1:{port}"}))
    (here / "event.json").write_text("{}")

    result = invoke("send-webhook", "event.json")

    assert result.exit_code == 1
    assert result.stderr == (
        f"grassroots: no stack answers at http://127.0.0.1:{port}/webhooks/clever (recorded in"
        f" {home / 'listeners.json'} by `grassroots run`; ConnectError): start one with"
        " `grassroots run`, or point elsewhere with --url URL (or --home DIR)\n"
    )


def test_the_demo_refuses_a_stack_that_does_not_answer_before_seeding_anything(
    here: Path, database_url: str
) -> None:
    keep(here / "var", "webhook-secret", signing.generate_secret())
    url = f"http://127.0.0.1:{closed_port()}/webhooks/clever"

    result = invoke("demo", "--url", url, DATABASE_URL=database_url)

    assert result.exit_code == 1
    assert result.stderr.startswith(f"grassroots: no stack answers at {url} (--url; ConnectError)")
    assert "point elsewhere with --url URL" in result.stderr
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Account)) == 0


# --- empty listings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["events", "list"], "no events"),
        (["events", "list", "--status", "dead"], "no dead events"),
        (
            ["events", "list", "--status", "held", "--type", "users.deleted"],
            "no held users.deleted events",
        ),
        (["events", "replay", "--status", "dead"], "no dead events to replay"),
        (
            ["events", "replay", "--status", "dead", "--type", "users.deleted", "--district", "d1"],
            "no dead users.deleted events in district d1 to replay",
        ),
        (["held", "list"], "no held removals"),
        (["held", "list", "--district", "d1"], "no held removals in district d1"),
        (["pause", "list"], "no pauses"),
        (
            ["operator", "list"],
            "no operators: add one with `grassroots operator add NAME --role operator`",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_an_empty_listing_says_so(
    database_url: str, configure: Configure, args: list[str], said: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)

    result = CliRunner().invoke(main, args)

    assert result.exit_code == 0, result.output
    assert result.stdout == said + "\n"


# --- JSON errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["account", "show", "nobody", "--json"], "no account nobody"),
        (["district", "preview", "nowhere", "--json"], "no district nowhere"),
        (["events", "show", "no-such-event"], "no event no-such-event"),
    ],
    ids=["account show", "district preview", "events show"],
)
def test_a_json_command_that_fails_prints_a_json_error_and_a_line_on_stderr(
    database_url: str, configure: Configure, args: list[str], message: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)

    result = CliRunner().invoke(main, args)

    assert result.exit_code == 1
    assert json.loads(result.stdout) == {"error": "not_found", "message": message}
    assert result.stderr == f"grassroots: {message}\n"


def test_without_json_the_error_is_only_the_line_on_stderr(
    database_url: str, configure: Configure
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)

    result = CliRunner().invoke(main, ["account", "show", "nobody"])

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "grassroots: no account nobody\n"


# --- the demo and the brake ------------------------------------------------------------------


def test_the_demo_says_where_the_removal_brake_stands_after_its_removal(
    database_url: str, configure: Configure
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER, REMOVAL_BRAKE_PERCENT="10")
    with session_scope() as session:
        load_snapshot(session, demo.example_roster())
    before = demo.brake_note("demo-1", "done")
    with session_scope() as session:
        # Steve's removal, as the worker records it once applied.
        session.add(
            RosterEvent(
                id="demo-1",
                type="users.deleted",
                district_id=demo.DISTRICT,
                object_id=demo.STEVE,
                payload={},
                status="done",
            )
        )
    rule = "REMOVAL_BRAKE_PERCENT=10% of its accounts in 24 h, at least one a day"

    # 10 % of 6 accounts is none whole: at least one a day.
    assert before == (
        f"The removal brake ({rule}) still allows 1 more removal in this district today."
    )
    assert demo.brake_note("demo-1", "done") == (
        f"The removal brake ({rule}) now allows no more removals in this district until those"
        " of the last 24 h age out: a further users.deleted there is held until an operator"
        " releases or discards it (`grassroots held list`)."
    )
    assert demo.brake_note("demo-2", "held").startswith(
        f"Steve's removal was held by the removal brake: this district's allowance ({rule}) is"
        " used, by an earlier demo most likely. `grassroots held release demo-2` applies it"
    )


# --- the worker's node name --------------------------------------------------------------------


@pytest.fixture
def workers_made(monkeypatch: pytest.MonkeyPatch, configure: Configure) -> list[dict[str, Any]]:
    """The arguments each ``grassroots worker`` gives Celery's worker, which is not started."""
    configure(BROKER_URL=CLOSED_BROKER)
    made: list[dict[str, Any]] = []

    class Worker:
        exitcode = 0

        def __init__(self, **kwargs: Any) -> None:
            made.append(kwargs)

        def start(self) -> None:
            pass

    monkeypatch.setattr(celery_app, "Worker", Worker)
    return made


def test_each_worker_process_has_a_node_name_of_its_own(
    workers_made: list[dict[str, Any]], tmp_path: Path, configure: Configure
) -> None:
    configure(DATABASE_URL=f"sqlite:///{tmp_path / 'named.db'}")

    result = CliRunner().invoke(main, ["worker"])

    assert result.exit_code == 0, result.output
    (kwargs,) = workers_made
    assert kwargs["hostname"] == f"grassroots-{os.getpid()}@{socket.gethostname()}"


def test_the_node_name_can_be_chosen_as_with_celery(
    workers_made: list[dict[str, Any]], tmp_path: Path, configure: Configure
) -> None:
    configure(DATABASE_URL=f"sqlite:///{tmp_path / 'named.db'}")

    result = CliRunner().invoke(main, ["worker", "-n", "exits@%h"])

    assert result.exit_code == 0, result.output
    assert workers_made[0]["hostname"] == f"exits@{socket.gethostname()}"


def test_a_worker_where_there_is_no_stack_refuses_to_start(
    here: Path, workers_made: list[dict[str, Any]]
) -> None:
    result = invoke("worker")

    assert result.exit_code == 1
    assert result.stderr == f"grassroots: {no_stack(here / 'var')}\n"
    assert workers_made == []
    assert tree(here) == []
