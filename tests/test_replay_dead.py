"""`events replay --status dead [--type T] [--district D]` (SPEC §5.6): every dead event that
matches goes round again, oldest first, in keyset pages of the (status, received_at) index, each
committed before it is sent: the work of one page never grows with the inbox's history."""

from __future__ import annotations

from datetime import timedelta

from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import AuditRecord, DeadLetter, EventStatus, RosterEvent, utcnow
from tasks import deadletters
from tests.support.app_env import CLOSED_BROKER, Configure
from tests.support.dead import dead_event, inbox_event
from worker.cli import main
from worker.db import session_scope

START = utcnow() - timedelta(days=3)


def event(
    session: Session,
    n: int,
    status: str = EventStatus.DEAD,
    *,
    type_: str = "users.deleted",
    district: str = "d1",
) -> str:
    """Event ``ev-<n>``, received ``n`` minutes after START; a dead one with its dead letter."""
    event_id = f"ev-{n:02d}"
    at = START + timedelta(minutes=n)
    if status == EventStatus.DEAD:
        dead_event(
            session,
            event_id,
            "OperationalError",
            error="lock timeout",
            type_=type_,
            district=district,
            received_at=at,
        )
        return event_id
    inbox_event(session, event_id, status, type_=type_, district=district, received_at=at)
    return event_id


def statuses(session: Session) -> dict[str, str]:
    return dict(session.execute(select(RosterEvent.id, RosterEvent.status)).tuples().all())


def test_dead_events_go_round_again_a_page_at_a_time_oldest_first(session: Session) -> None:
    dead = [event(session, n) for n in (5, 1, 4, 2, 3)]
    for n in range(10, 20):
        event(session, n, EventStatus.DONE)
    pages = []
    after: deadletters.PageKey | None = None
    while True:
        ids, after = deadletters.replay_dead_page(session, by="test", after=after, limit=2)
        pages.append(ids)
        if after is None:
            break

    assert pages == [["ev-01", "ev-02"], ["ev-03", "ev-04"], ["ev-05"]]
    assert {e for e, s in statuses(session).items() if s == EventStatus.ACCEPTED} == set(dead)
    open_letters = select(func.count()).where(DeadLetter.resolved_at.is_(None))
    assert session.scalar(open_letters.select_from(DeadLetter)) == 0
    audited = session.scalars(select(AuditRecord.subject_id).where(AuditRecord.action == "replay"))
    assert sorted(audited) == sorted(dead)


def test_an_event_that_dies_again_behind_the_pages_is_not_sent_twice(session: Session) -> None:
    for n in (1, 2, 3):
        event(session, n)
    first, after = deadletters.replay_dead_page(session, by="test", limit=2)
    # ev-01 failed again at once, before the next page was read.
    session.get_one(RosterEvent, "ev-01").status = EventStatus.DEAD
    session.flush()

    second, end = deadletters.replay_dead_page(session, by="test", after=after, limit=2)

    assert (first, second, end) == (["ev-01", "ev-02"], ["ev-03"], None)


def test_a_page_takes_only_the_type_and_district_asked_for(session: Session) -> None:
    event(session, 1, type_="users.deleted", district="d1")
    event(session, 2, type_="sections.deleted", district="d1")
    event(session, 3, type_="users.deleted", district="d2")
    event(session, 4, type_="users.deleted", district="d1")

    ids, after = deadletters.replay_dead_page(
        session, by="test", type_="users.deleted", district_id="d1"
    )

    assert (ids, after) == (["ev-01", "ev-04"], None)
    assert statuses(session)["ev-02"] == statuses(session)["ev-03"] == EventStatus.DEAD


def test_grassroots_events_replay_status_dead_by_district(
    configure: Configure, database_url: str
) -> None:
    configure(DATABASE_URL=database_url, BROKER_URL=CLOSED_BROKER)
    with session_scope() as session:
        event(session, 1, district="d1")
        event(session, 2, district="d2")
        event(session, 3, district="d1", type_="sections.deleted")
    runner = CliRunner()

    misuse = runner.invoke(main, ["events", "replay", "ev-01", "--district", "d1"])
    by_both = runner.invoke(
        main,
        ["events", "replay", "--status", "dead", "--district", "d1", "--type", "users.deleted"],
    )
    by_district = runner.invoke(main, ["events", "replay", "--status", "dead", "--district", "d1"])

    assert misuse.exit_code == 2
    assert "--type and --district go with --status" in misuse.output
    # The broker is closed: the relay sends them once it is back.
    assert by_both.exit_code == 0, by_both.output
    assert by_both.output == "replaying 1 event(s); 1 left for the relay\n"
    assert by_district.output == "replaying 1 event(s); 1 left for the relay\n"
    with session_scope() as session:
        assert statuses(session) == {
            "ev-01": EventStatus.ACCEPTED,
            "ev-02": EventStatus.DEAD,
            "ev-03": EventStatus.ACCEPTED,
        }
