"""SPEC §6: every conversion, hold, release, replay and restore is written to the audit log with
its trigger, each by the rule that does it."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models import AuditRecord, EventStatus, RosterEvent
from tasks import brake, conversion, deadletters, events
from tasks.inbox import ingest
from tasks.roster import load_snapshot
from tests.support.scenario import DISTRICT, MARIA, STEVE, example


def removal(session: Session, event_id: str, who: str) -> None:
    obj = {"id": who, "district": DISTRICT, "roles": {"student": {}}}
    raw = {
        "id": event_id,
        "type": "users.deleted",
        "created": "2026-10-01T00:00:00Z",
        "data": {"object": obj},
    }
    ingest(session, raw, source="webhook")


def audit_log(session: Session) -> list[tuple[str, str, str]]:
    rows = session.execute(
        select(AuditRecord.action, AuditRecord.trigger, AuditRecord.subject_id).order_by(
            AuditRecord.id
        )
    )
    return [(str(a), t, s) for a, t, s in rows.tuples()]


def test_conversion_hold_release_replay_and_restore_are_each_audited_with_their_trigger(
    session: Session,
) -> None:
    load_snapshot(session, example())
    limits = events.Limits(brake_percent=10)
    removal(session, "d-steve", STEVE)
    removal(session, "d-maria", MARIA)
    # Six active accounts at 10 %: the first removal passes, the second is held.
    assert [events.process_event(session, e, limits) for e in ("d-steve", "d-maria")]
    assert brake.release_held(session, event_id="d-maria", by="cli:release") == ["d-maria"]
    assert events.process_event(session, "d-maria", limits) is not None
    session.execute(
        update(RosterEvent).where(RosterEvent.id == "d-steve").values(status=EventStatus.DEAD)
    )
    assert deadletters.mark_replay(session, "d-steve", by="ops:replay") == deadletters.REPLAYED
    conversion.restore(session, STEVE, trigger="cli:restore", retention_days=30)

    log = audit_log(session)

    by_steve, by_maria = "event:users.deleted:d-steve", "event:users.deleted:d-maria"
    for entry in (
        ("convert", by_steve, STEVE),
        ("hold", by_maria, MARIA),
        ("release", "cli:release", "d-maria"),
        ("convert", by_maria, MARIA),
        ("replay", "ops:replay", "d-steve"),
        ("restore", "cli:restore", STEVE),
    ):
        assert entry in log, (entry, log)
