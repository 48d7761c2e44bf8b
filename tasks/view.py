"""Read models: the account view (SPEC §5.4), district-report access, and the exit preview.

Everything here reads only live rows (``removed_by IS NULL``, in a live class), which is what
makes a soft removal invisible the moment it commits.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from models import (
    Account,
    AccountKind,
    AccountStatus,
    Assignment,
    Class,
    ClassTeacher,
    District,
    DistrictStatus,
    Enrollment,
    Goal,
    ReportAccess,
    Role,
    SkillProgress,
)
from tasks.conversion import AccountState, full_conversion
from tasks.conversion.apply import STATE_COLUMNS
from tasks.errors import NotFound
from tasks.sql import count

DISTRICT_ACCESS_ENDED = (
    "This account is no longer part of the district program: district reports are not available."
)


def find_account(session: Session, ref: str) -> Account:
    """An account by our id or its Clever id."""
    account = session.get(Account, ref) or session.scalar(
        select(Account).where(Account.clever_id == ref)
    )
    if account is None:
        raise NotFound(f"no account {ref}")
    return account


def _live_links(link: Any, who: Any, account_id: str) -> Any:
    return (
        select(link.class_id)
        .join(Class, Class.id == link.class_id)
        .where(who == account_id, link.removed_by.is_(None), Class.removed_by.is_(None))
    )


def reports_allowed(session: Session, account: Account) -> bool:
    if (
        account.kind != AccountKind.DISTRICT
        or account.status != AccountStatus.ACTIVE
        or not account.is_admin
    ):
        return False
    return (
        session.scalar(
            select(func.count())
            .select_from(ReportAccess)
            .join(District, District.id == ReportAccess.district_id)
            .where(
                ReportAccess.account_id == account.id,
                ReportAccess.district_id == account.district_id,
                ReportAccess.removed_by.is_(None),
                District.status == DistrictStatus.ACTIVE,
            )
        )
        or 0
    ) > 0


def account_view(session: Session, ref: str) -> dict[str, Any]:
    account = find_account(session, ref)
    taught = set(session.scalars(_live_links(ClassTeacher, ClassTeacher.teacher_id, account.id)))
    enrolled = set(session.scalars(_live_links(Enrollment, Enrollment.student_id, account.id)))
    class_ids = sorted(taught | enrolled)
    classes = session.execute(
        select(Class.id, Class.name, Class.district_synced)
        .where(Class.id.in_(class_ids))
        .order_by(Class.id)
    ).all()

    def visible(model: Any) -> list[dict[str, str]]:
        rows = session.execute(
            select(model.id, model.class_id)
            .where(model.class_id.in_(class_ids), model.removed_by.is_(None))
            .order_by(model.id)
        )
        return [{"id": i, "class": c} for i, c in rows]

    coaches = session.scalars(
        select(ClassTeacher.teacher_id)
        .distinct()
        .where(
            ClassTeacher.class_id.in_(sorted(enrolled)),
            ClassTeacher.removed_by.is_(None),
            ClassTeacher.teacher_id != account.id,
        )
        .order_by(ClassTeacher.teacher_id)
    ).all()
    students = session.scalars(
        select(Enrollment.student_id)
        .distinct()
        .where(
            Enrollment.class_id.in_(sorted(taught)),
            Enrollment.removed_by.is_(None),
            Enrollment.student_id != account.id,
        )
        .order_by(Enrollment.student_id)
    ).all()
    progress = session.execute(
        select(SkillProgress.skill, SkillProgress.points, SkillProgress.mastery)
        .where(SkillProgress.student_id == account.id)
        .order_by(SkillProgress.skill)
    ).all()
    return {
        "id": account.id,
        "clever_id": account.clever_id,
        "email": account.email,
        "kind": account.kind,
        "status": account.status,
        "roles": sorted(account.roles),
        "district": account.district_id,
        "district_reports": "allowed" if reports_allowed(session, account) else "denied",
        "classes": [{"id": i, "name": n, "district_synced": bool(s)} for i, n, s in classes],
        "goals": visible(Goal),
        "assignments": visible(Assignment),
        "coaches": list(coaches),
        "students": list(students),
        "progress": [{"skill": s, "points": p, "mastery": m} for s, p, m in progress],
    }


def preview_exit(session: Session, district_id: str) -> dict[str, Any]:
    """What a district exit would change, per role and per account. Reads only."""
    district = session.get(District, district_id)
    if district is None:
        raise NotFound(f"no district {district_id}")
    live_classes = select(Class.id).where(
        Class.district_id == district_id, Class.removed_by.is_(None)
    )
    granted = set(
        session.scalars(
            select(ReportAccess.account_id).where(
                ReportAccess.district_id == district_id, ReportAccess.removed_by.is_(None)
            )
        )
    )
    per_account, per_role = _preview_accounts(
        session, district_id, district.admin_removal, live_classes, granted
    )

    def live_rows(model: Any) -> int:
        return count(session, model, model.class_id.in_(live_classes), model.removed_by.is_(None))

    return {
        "district": district_id,
        "name": district.name,
        "status": district.status,
        "policy": {"admin_removal": district.admin_removal},
        "accounts": len(per_account),
        "roles": per_role,
        "classes_removed": session.scalar(select(func.count()).select_from(live_classes.subquery()))
        or 0,
        "enrollments_removed": live_rows(Enrollment),
        "teacher_links_removed": live_rows(ClassTeacher),
        "goals_removed": live_rows(Goal),
        "assignments_removed": live_rows(Assignment),
        "report_grants_revoked": len(granted),
        "per_account": per_account,
    }


def _preview_accounts(
    session: Session,
    district_id: str,
    policy: str,
    live_classes: Select[tuple[str]],
    granted: set[str],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Each district account as the exit would leave it, and the counts per role."""
    accounts = session.execute(
        select(*STATE_COLUMNS)
        .where(Account.district_id == district_id, Account.kind == AccountKind.DISTRICT)
        .order_by(Account.id)
    ).all()
    teaching = Counter(
        session.scalars(
            select(ClassTeacher.teacher_id).where(
                ClassTeacher.class_id.in_(live_classes), ClassTeacher.removed_by.is_(None)
            )
        )
    )
    enrolled = Counter(
        session.scalars(
            select(Enrollment.student_id).where(
                Enrollment.class_id.in_(live_classes), Enrollment.removed_by.is_(None)
            )
        )
    )
    per_account = []
    per_role: dict[str, Counter[str]] = {role: Counter() for role in Role}
    for row in accounts:
        state = AccountState.of(row)
        plan = full_conversion(row.id, state, policy)
        per_account.append(
            {
                "id": row.id,
                "roles": sorted(state.roles),
                "roles_after": sorted(plan.target.roles),
                "status_after": plan.target.status,
                "kind_after": plan.target.kind,
                "district_classes_left": teaching[row.id],
                "district_enrollments_removed": enrolled[row.id],
                "district_reports_revoked": row.id in granted,
            }
        )
        removed = plan.target.status == AccountStatus.REMOVED
        for role in state.roles:
            per_role[role]["accounts"] += 1
            per_role[role]["removed" if removed else "converted"] += 1
    roles = {
        role: {"accounts": c["accounts"], "converted": c["converted"], "removed": c["removed"]}
        for role, c in per_role.items()
    }
    return per_account, roles
