"""The conversion rules of SPEC §3: what an account becomes when it leaves the program, or when
one of its roles ends. Pure functions: they read an account's state and return a plan; applying
it is ``tasks.conversion.apply``'s job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from models import AccountKind, AccountStatus, AdminRemoval, Role, role_flags, roles_of


@dataclass(frozen=True)
class AccountState:
    roles: frozenset[Role]
    kind: str
    status: str
    district_id: str | None

    @classmethod
    def of(cls, row: Any) -> AccountState:
        """From a row with the account's role flags, kind, status and district."""
        return cls(
            roles_of(row.is_admin, row.is_teacher, row.is_student),
            row.kind,
            row.status,
            row.district_id,
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AccountState:
        roles = frozenset(Role(r) for r in data["roles"])
        return cls(roles, data["kind"], data["status"], data["district_id"])

    def as_json(self) -> dict[str, Any]:
        return {
            "roles": sorted(self.roles),
            "kind": self.kind,
            "status": self.status,
            "district_id": self.district_id,
        }

    def columns(self) -> dict[str, Any]:
        return {
            **role_flags(self.roles),
            "kind": self.kind,
            "status": self.status,
            "district_id": self.district_id,
        }


@dataclass(frozen=True)
class Plan:
    """One account's conversion: the state it ends in and which district-owned links go."""

    account_id: str
    target: AccountState
    strip_student: bool
    strip_teacher: bool
    strip_admin: bool
    # As journaled: ``<roles>[:<policy>]`` for a full conversion (the policy only for an
    # admin), ``lost:<roles>`` for a role that ended. ``rule_outcome`` reads it back.
    rule: str


LOST = "lost"


def full_conversion(account_id: str, state: AccountState, policy: str) -> Plan:
    """Leave the program entirely (roster absence or district exit), every role's rule applied.

    Student and teacher: grassroots account, login kept. Admin, by the district's policy:
    ``convert`` makes it a grassroots teacher; ``remove`` keeps the login only for an admin who is
    also a teacher, and otherwise removes the account (admin role and report access go either way).
    """
    roles = set(state.roles)
    status = state.status
    rule = "+".join(sorted(roles)) or "none"
    if Role.ADMIN in roles:
        roles.discard(Role.ADMIN)
        if policy == AdminRemoval.CONVERT:
            roles.add(Role.TEACHER)
        elif Role.TEACHER not in roles and Role.STUDENT not in roles:
            status = AccountStatus.REMOVED
        rule = f"{rule}:{policy}"
    target = AccountState(frozenset(roles), AccountKind.GRASSROOTS, status, None)
    return Plan(account_id, target, True, True, True, rule)


def role_loss(account_id: str, state: AccountState, lost: Iterable[str], policy: str) -> Plan:
    """A Clever role ended: apply that role's rule and keep the roles that remain.

    An account left with no role has left the program: it gets the full conversion.
    """
    ended = {Role(r) for r in lost} & state.roles
    remaining = state.roles - ended
    if state.kind != AccountKind.DISTRICT or not ended:
        return Plan(account_id, state, False, False, False, "none")
    if not remaining:
        return full_conversion(account_id, state, policy)
    target = AccountState(remaining, state.kind, state.status, state.district_id)
    return Plan(
        account_id,
        target,
        strip_student=Role.STUDENT in ended,
        strip_teacher=Role.TEACHER in ended,
        strip_admin=Role.ADMIN in ended,
        rule=f"{LOST}:" + "+".join(sorted(ended)),
    )


def rule_outcome(rule: str) -> tuple[str, str]:
    """(roles, outcome) of a journaled rule, for metrics: ``converted``, ``removed`` (an admin
    only, under the ``remove`` policy) or ``role_removed`` (a role that ended)."""
    roles, _, detail = rule.partition(":")
    if roles == LOST:
        return detail or "none", "role_removed"
    removed = detail == AdminRemoval.REMOVE and roles == Role.ADMIN
    return roles or "none", "removed" if removed else "converted"
