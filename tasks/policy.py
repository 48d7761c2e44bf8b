"""A district's own requirements (SPEC §3, §4): its ``admin_removal`` policy and its own removal
brake percentage, set by an operator and recorded in the audit log. A district a sync creates
starts with ``convert`` and the deployment's REMOVAL_BRAKE_PERCENT."""

from __future__ import annotations

import math
from typing import Any, Final, Literal

from sqlalchemy.orm import Session

from models import AdminRemoval, AuditAction, AuditRecord, District
from tasks.errors import InvalidInput, NotFound

# ``brake_percent=DEFAULT_BRAKE``: the district follows REMOVAL_BRAKE_PERCENT again.
DEFAULT_BRAKE: Final = "default"


def check_brake_percent(percent: float) -> float:
    """A brake percentage an operator may set: above 0 (a brake that holds every removal is
    what a roster pause is for) and at most 100."""
    if not math.isfinite(percent) or not 0 < percent <= 100:
        raise InvalidInput(f"a brake percentage is above 0 and at most 100, not {percent:g}")
    return percent


def set_policy(
    session: Session,
    district_id: str,
    *,
    admin_removal: AdminRemoval | None = None,
    brake_percent: float | Literal["default"] | None = None,
    by: str,
) -> dict[str, Any]:
    """Change what is given (None: unchanged); the district's policy as it now stands. A bad
    percentage (``InvalidInput``) or an unknown district (``NotFound``) changes nothing."""
    if brake_percent is not None and brake_percent != DEFAULT_BRAKE:
        check_brake_percent(brake_percent)
    district = session.get(District, district_id, with_for_update=True)
    if district is None:
        raise NotFound(f"no district {district_id}")
    before = policy_of(district)
    if admin_removal is not None:
        district.admin_removal = admin_removal
    if brake_percent == DEFAULT_BRAKE:
        district.brake_percent = None
    elif brake_percent is not None:
        district.brake_percent = brake_percent
    after = policy_of(district)
    if after != before:
        session.add(
            AuditRecord(
                action=AuditAction.POLICY,
                trigger=by,
                subject_type="district",
                subject_id=district_id,
                details={"before": before, "after": after},
            )
        )
    return after


def policy_of(district: District) -> dict[str, Any]:
    """``brake_percent`` None: the district follows REMOVAL_BRAKE_PERCENT."""
    return {"admin_removal": district.admin_removal, "brake_percent": district.brake_percent}
