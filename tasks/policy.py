"""A district's own requirements (SPEC §3, §4): its ``admin_removal`` policy, set by an operator
and recorded in the audit log. A district a sync creates starts with ``convert``."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from models import AdminRemoval, AuditRecord, District
from tasks.errors import NotFound


def set_policy(
    session: Session, district_id: str, *, admin_removal: AdminRemoval | None, by: str
) -> dict[str, Any]:
    """Change what is given; the district's policy as it now stands."""
    district = session.get(District, district_id, with_for_update=True)
    if district is None:
        raise NotFound(f"no district {district_id}")
    before = policy_of(district)
    if admin_removal is not None:
        district.admin_removal = admin_removal
    after = policy_of(district)
    if after != before:
        session.add(
            AuditRecord(
                action="policy",
                trigger=by,
                subject_type="district",
                subject_id=district_id,
                details={"before": before, "after": after},
            )
        )
    return after


def policy_of(district: District) -> dict[str, Any]:
    return {"admin_removal": district.admin_removal}
