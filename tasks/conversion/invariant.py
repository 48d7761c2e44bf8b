"""The learner-data invariant (SPEC §3): a digest of everything an account owns as a learner,
taken before and after a conversion inside its transaction. A mismatch aborts the conversion."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    String,
    cast,
    func,
    literal,
    select,
    union_all,
)
from sqlalchemy.orm import Session

from models import Account, Assignment, Class, ClassTeacher, Enrollment, Goal, SkillProgress
from tasks.errors import InvariantViolation
from tasks.sql import InIds, RowHash, chunks, ids_params

OWNERS = "owners"  # the name of the accounts' ids in the statement (``ids_params``)


def learner_checksums(session: Session, account_ids: Sequence[str]) -> dict[str, str]:
    """A digest per account of everything it owns as a learner (SPEC §2, right column).

    Identity and login fields, every skill-progress row, and its independent classes with their
    memberships, goals and assignments. A conversion must leave every digest as it found it.

    The database computes it: each owned row is hashed (``RowHash``); an account's digest is the
    count and the sum of its rows' hashes. One statement per thousand accounts, and no
    learner data crosses the wire.
    """
    digests: dict[str, str] = {}
    for ids in chunks(account_ids):
        as_text, params = ids_params(OWNERS, ids)
        for owner, count, total in session.execute(_digests(as_text), params):
            digests[owner] = f"{count}:{int(total)}"
    return {acct: digests.get(acct, "0:0") for acct in account_ids}


@functools.cache
def _digests(as_text: bool) -> Select[tuple[str, int, int]]:
    """The digests statement, built once: each conversion takes it twice, and building it costs
    more than running it for one account."""

    def owned_by(column: Any, *, skewed: bool = False) -> ColumnElement[bool]:
        return InIds.named(column, OWNERS, as_text=as_text, skewed=skewed)

    # The account's memberships of independent classes, first: the few rows the goals and
    # assignments of those classes are then looked up by.
    links = union_all(
        *(
            select(
                who.label("owner"),
                literal(link.__tablename__, String).label("tag"),
                link.class_id.label("class_id"),
                link.removed_by.label("removed_by"),
            )
            .join(Class, Class.id == link.class_id)
            .where(owned_by(who, skewed=skewed), Class.district_synced.is_(False))
            for link, who, skewed in (
                # A teacher links to many classes: Postgres keeps its most common ids.
                (ClassTeacher, ClassTeacher.teacher_id, True),
                (Enrollment, Enrollment.student_id, False),
            )
        )
    ).cte("links")
    records: list[Select[tuple[str, int]]] = [
        select(
            Account.id.label("owner"),
            RowHash("account", Account.clever_id, Account.email, Account.name).label("hash"),
        ).where(owned_by(Account.id)),
        select(
            SkillProgress.student_id,
            RowHash("progress", SkillProgress.skill, SkillProgress.points, SkillProgress.mastery),
        ).where(owned_by(SkillProgress.student_id)),
        select(links.c.owner, RowHash(links.c.tag, links.c.class_id, links.c.removed_by)),
        *(
            select(
                links.c.owner,
                RowHash(owned.__tablename__, owned.id, owned.class_id, owned.removed_by),
            ).join(owned, owned.class_id == links.c.class_id)
            for owned in (Goal, Assignment)
        ),
    ]
    rows = union_all(*records).subquery()
    # Up to 2**23 rows of 40-bit hashes per account, the sum fits a BIGINT, which reads back
    # faster than the NUMERIC Postgres' sum() gives.
    return select(rows.c.owner, func.count(), cast(func.sum(rows.c.hash), BigInteger)).group_by(
        rows.c.owner
    )


def check_invariant(session: Session, before: dict[str, str]) -> None:
    """Raise ``InvariantViolation`` if any digest in ``before`` changed."""
    after = learner_checksums(session, list(before))
    broken = sorted(a for a, digest in before.items() if after.get(a) != digest)
    if broken:
        raise InvariantViolation(broken)
