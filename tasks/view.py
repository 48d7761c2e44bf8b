"""Read models: the account view (SPEC §5.4), district-report access, and the exit preview.

Everything here reads only live rows (``removed_by IS NULL``, in a live class), which is what
makes a soft removal invisible the moment it commits.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import (
    Account,
    Assignment,
    Class,
    ClassTeacher,
    District,
    Enrollment,
    Goal,
    ReportAccess,
    SkillProgress,
)
from tasks.conversion import AccountState, full_conversion
from tasks.errors import NotFound

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
    if account.kind != "district" or account.status != "active" or not account.is_admin:
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
                District.status == "active",
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
    accounts = session.execute(
        select(
            Account.id,
            Account.is_admin,
            Account.is_teacher,
            Account.is_student,
            Account.kind,
            Account.status,
            Account.district_id,
        )
        .where(Account.district_id == district_id, Account.kind == "district")
        .order_by(Account.id)
    ).all()
    live_classes = select(Class.id).where(
        Class.district_id == district_id, Class.removed_by.is_(None)
    )
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
    granted = set(
        session.scalars(
            select(ReportAccess.account_id).where(
                ReportAccess.district_id == district_id, ReportAccess.removed_by.is_(None)
            )
        )
    )

    def count(model: Any) -> int:
        return (
            session.scalar(
                select(func.count())
                .select_from(model)
                .where(model.class_id.in_(live_classes), model.removed_by.is_(None))
            )
            or 0
        )

    per_account = []
    per_role: dict[str, Counter[str]] = {r: Counter() for r in ("admin", "teacher", "student")}
    for row in accounts:
        state = AccountState.of(row)
        plan = full_conversion(row.id, state, district.admin_removal)
        item = {
            "id": row.id,
            "roles": sorted(state.roles),
            "roles_after": sorted(plan.target.roles),
            "status_after": plan.target.status,
            "kind_after": plan.target.kind,
            "district_classes_left": teaching[row.id],
            "district_enrollments_removed": enrolled[row.id],
            "district_reports_revoked": row.id in granted,
        }
        per_account.append(item)
        for role in state.roles:
            per_role[role]["accounts"] += 1
            per_role[role]["removed" if plan.target.status == "removed" else "converted"] += 1
    class_count = session.scalar(select(func.count()).select_from(live_classes.subquery())) or 0
    return {
        "district": district_id,
        "name": district.name,
        "status": district.status,
        "policy": {"admin_removal": district.admin_removal},
        "accounts": len(per_account),
        "roles": {
            role: {"accounts": c["accounts"], "converted": c["converted"], "removed": c["removed"]}
            for role, c in per_role.items()
        },
        "classes_removed": class_count,
        "enrollments_removed": count(Enrollment),
        "teacher_links_removed": count(ClassTeacher),
        "goals_removed": count(Goal),
        "assignments_removed": count(Assignment),
        "report_grants_revoked": len(granted),
        "per_account": per_account,
    }
