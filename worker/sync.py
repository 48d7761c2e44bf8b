"""The roster sync from the Clever Data API (SPEC §5.8): pull a district whole with its token,
then reconcile the pull with the mirror (``tasks.reconcile``).

Clever's events are a convenience over a 30-day window: an app loads each district whole, syncs
at least daily and on demand, and again after a gap. Before the pull the sync records the
newest event of the district's feed, and once its changes are committed the poller goes on from
there. A pull that did not complete applies nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel, ValidationError

from models import RequestKind, RosterSync, SyncStatus, utcnow
from tasks import cursors, operator_requests, roster_syncs
from tasks import reconcile as reconciling
from tasks.errors import GrassrootsError
from tasks.roster import CleverSection, CleverUser
from tasks.storable import explain
from worker import dispatch
from worker.clever import (
    CleverClient,
    CleverError,
    ClientOptions,
    DistrictToken,
    describe_error,
    parse_tokens,
)
from worker.db import session_scope
from worker.dispatch import enqueue_events
from worker.poller import newest
from worker.services import BrokerUnavailable
from worker.settings import Settings, get_settings

log = logging.getLogger("grassroots.sync")
Shape = TypeVar("Shape", bound=BaseModel)

# Clever's largest page: the fewest requests for a district of 100,000 users.
DATA_PAGE_SIZE = 10_000


class PullError(CleverError):
    """The pull cannot be trusted to be complete: nothing is applied."""


@dataclass(frozen=True)
class SyncOptions(ClientOptions):
    page_size: int = DATA_PAGE_SIZE
    brake_percent: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SyncOptions:
        return cls(base_url=settings.clever_api_base, brake_percent=settings.removal_brake_percent)


def sync_district(
    token: DistrictToken,
    options: SyncOptions,
    *,
    dry_run: bool = False,
    trigger: str,
    sync_id: str | None = None,
) -> roster_syncs.Report:
    """Sync one district; its report, ``failed`` with the reason if the pull did not complete.
    ``sync_id``: the sync's record, if the caller made it already (the ops API answers with it
    before the sync runs)."""
    sync_id = sync_id or operator_requests.new_id()
    district_id = token.district_id
    with session_scope() as session:
        if session.get(RosterSync, sync_id) is None:
            roster_syncs.begin(session, district_id, sync_id, trigger=trigger, dry_run=dry_run)
    try:
        with CleverClient(token, options) as api:
            # Where the feed stands before the pull: what happens during it is read after it.
            position = newest(api)
            pull = pull_district(api, district_id, options.page_size)
    except (CleverError, httpx.HTTPError) as exc:
        reason = describe_error(exc)
        log.warning("district %s: sync %s failed: %s", district_id, sync_id, reason)
        with session_scope() as session:
            roster_syncs.fail(session, sync_id, reason)
        return roster_syncs.Report(district_id, sync_id, SyncStatus.FAILED, reason)
    with session_scope() as session:
        roster_syncs.record_position(session, sync_id, position)
        report = reconciling.reconcile(
            session, pull, sync_id, dry_run=dry_run, brake_percent=options.brake_percent
        )
        if report.status == SyncStatus.DONE and not dry_run:
            cursors.resume_from(session, district_id, position)
    # After the commit, never before: a worker must find the rows.
    enqueue_events(report.events)
    log.info(
        "district %s: sync %s %s",
        district_id,
        sync_id,
        report.status,
        extra={"changes": report.changes, "reason": report.reason, "dry_run": dry_run},
    )
    return report


# A district that needs a resync gets one at most this often, while its last one keeps failing.
RESYNC_EVERY = timedelta(minutes=10)


def start(district_id: str, *, dry_run: bool = False, trigger: str) -> str:
    """Record a district's sync and its request, then send it to the workers; its id. Raises
    what the broker raises (the request is then withdrawn and the sync's record ends as failed,
    unless a worker took it all the same)."""
    with session_scope() as session:
        asked = operator_requests.ask(
            session, RequestKind.SYNC, district_id, by=trigger, dry_run=dry_run
        )
        roster_syncs.begin(session, district_id, asked.id, trigger=trigger, dry_run=dry_run)
    try:
        dispatch.send_request(asked)
    except dispatch.SEND_ERRORS as exc:
        with session_scope() as session:
            if not operator_requests.withdraw(session, asked.id):
                return asked.id
            roster_syncs.fail(session, asked.id, f"not sent to the workers: {type(exc).__name__}")
        raise
    return asked.id


def request(district_id: str, *, dry_run: bool, trigger: str) -> str:
    """An operator's sync of one district (the ops API): sent to the workers; its id. Refused
    for a district with no token; ``BrokerUnavailable`` if the broker cannot take it."""
    tokens = parse_tokens(get_settings().clever_district_tokens)
    if district_id not in {t.district_id for t in tokens}:
        raise GrassrootsError(f"CLEVER_DISTRICT_TOKENS has no token for district {district_id}")
    try:
        return start(district_id, dry_run=dry_run, trigger=trigger)
    except dispatch.SEND_ERRORS as exc:
        raise BrokerUnavailable(
            f"the broker is unreachable ({type(exc).__name__}): the sync was not started"
        ) from exc


def resync_if_due(district_id: str) -> str | None:
    """A district whose events were missed (SPEC §5.3) gets a sync without an operator, unless
    one runs or the last ended a moment ago; the new sync's id, if one was sent."""
    with session_scope() as session:
        due = roster_syncs.resync_due(session, district_id, now=utcnow(), every=RESYNC_EVERY)
    if not due:
        return None
    try:
        return start(district_id, trigger="resync")
    except dispatch.SEND_ERRORS:
        return None  # the next poll pass asks again


def pull_district(api: CleverClient, district_id: str, page_size: int) -> reconciling.Pull:
    """The district whole: its record, every user and every section, or a ``PullError``."""
    started = utcnow()
    district = api.get(f"/v3.0/districts/{district_id}").get("data")
    if not isinstance(district, dict) or district.get("id") != district_id:
        raise PullError(f"/v3.0/districts/{district_id} did not answer that district")
    name = district.get("name")
    # Kept compact as each page is read: a district has 100,000 users.
    users: dict[str, reconciling.PulledUser] = {}
    for where, obj in _items(api, "/v3.0/users", page_size):
        user = reconciling.pulled_user(_valid(CleverUser, obj, where))
        users[user.id] = user
    sections: dict[str, reconciling.PulledSection] = {}
    for where, obj in _items(api, "/v3.0/sections", page_size):
        section = reconciling.pulled_section(_valid(CleverSection, obj, where))
        sections[section.id] = section
    return reconciling.Pull(
        district_id,
        name if isinstance(name, str) and name.strip() else district_id,
        users,
        sections,
        started,
    )


def _items(api: CleverClient, path: str, page_size: int) -> Iterator[tuple[str, Any]]:
    """Every item of a list, page after page along ``links`` rel=next to an empty page; each with
    where it was found (for an error message). A page that does not move forward fails."""
    uri: str | None = f"{path}?{urlencode({'limit': page_size})}"
    seen: set[str] = set()
    last: str | None = None
    n = 0
    while uri is not None:
        if uri in seen:
            raise PullError(f"{path}: a next link repeats a page already read")
        seen.add(uri)
        page = api.page(uri)
        if not page.items:
            return
        ids = []
        for item in page.items:
            obj = item.get("data") if isinstance(item, dict) and "data" in item else item
            ids.append(obj.get("id") if isinstance(obj, dict) else None)
            yield f"{path}[{n}]", obj
            n += 1
        if ids[-1] is None or ids[-1] == last:
            raise PullError(f"{path}: a page that does not move forward")
        last = ids[-1]
        uri = page.next_uri


def _valid(shape: type[Shape], obj: Any, where: str) -> Shape:
    try:
        return shape.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False)[0]
        found = obj.get("id") if isinstance(obj, dict) else None
        named = f" (id {found})" if isinstance(found, str) and len(found) <= 64 else ""
        path = ".".join(map(str, err["loc"]))
        raise PullError(f"{where}{named}: {path}: {explain(err)}") from None
