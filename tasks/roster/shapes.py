"""The shapes of the district mirror's input: Clever v3 ``User`` and ``Section`` objects (from a
roster snapshot or a roster event), and the roster snapshot of ``grassroots seed`` (SPEC §5.1).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models import AdminRemoval, CleverRole, Mastery, Role
from tasks.errors import GrassrootsError

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
ID_MAX_LENGTH = 64
Id = Annotated[str, Field(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
# The Clever roles that make a platform role.
CLEVER_ROLES: dict[str, Role] = {
    clever: platform for clever in CleverRole if (platform := clever.platform_role) is not None
}


class SnapshotError(GrassrootsError):
    """The snapshot is malformed; the message names the bad record. Nothing was written."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CleverName(_Record):
    first: str | None = None
    middle: str | None = None
    last: str | None = None

    def full(self) -> str | None:
        return " ".join(p for p in (self.first, self.last) if p) or None


class CleverUser(_Record):
    id: Id
    district: Id
    email: str | None = None
    name: CleverName | None = None
    # Keyed by text, not CleverRole: an unknown role gets the message below, which names the
    # roles a user may hold (staff and contacts are not among them).
    roles: dict[str, dict[str, Any] | None]

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, roles: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(roles) - set(CLEVER_ROLES))
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r} (expected {', '.join(CLEVER_ROLES)})")
        if not roles:
            raise ValueError("a user needs at least one role")
        return roles

    @property
    def platform_roles(self) -> set[Role]:
        return {CLEVER_ROLES[r] for r in self.roles}


class CleverSection(_Record):
    id: Id
    district: Id
    name: str = Field(min_length=1, max_length=500)
    teacher: Id | None = None
    teachers: list[Id] = []
    students: list[Id] = []

    @property
    def all_teachers(self) -> list[str]:
        return list(dict.fromkeys([*([self.teacher] if self.teacher else []), *self.teachers]))


class Policy(_Record):
    admin_removal: AdminRemoval = AdminRemoval.CONVERT


class DistrictRecord(_Record):
    id: Id
    name: str = Field(min_length=1, max_length=500)
    policy: Policy = Policy()


class PlatformAccount(_Record):
    id: Id
    email: str | None = None
    name: str | None = None
    # Role's values, spelled out: a Literal of the enum's members would name them in its
    # message as "<Role.TEACHER: 'teacher'>".
    roles: list[Literal["teacher", "student"]] = Field(min_length=1)


class PlatformClass(_Record):
    id: Id
    name: str = Field(min_length=1, max_length=500)
    teacher: Id
    students: list[Id] = []


class ClassItem(_Record):
    """Something a teacher created in one class."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    id: Id
    class_id: Id = Field(alias="class")
    created_by: Id | None = None


class PlatformGoal(ClassItem):
    course: str = Field(min_length=1, max_length=200)


class PlatformAssignment(ClassItem):
    title: str = Field(min_length=1, max_length=500)


class Progress(_Record):
    user: Id
    skill: str = Field(min_length=1, max_length=200)
    points: int = Field(ge=0)
    mastery: Mastery


class Platform(_Record):
    accounts: list[PlatformAccount] = []
    classes: list[PlatformClass] = []
    goals: list[PlatformGoal] = []
    assignments: list[PlatformAssignment] = []
    progress: list[Progress] = []


class Snapshot(_Record):
    model_config = ConfigDict(extra="forbid", frozen=True)
    districts: list[DistrictRecord] = []
    users: list[CleverUser] = []
    sections: list[CleverSection] = []
    platform: Platform = Platform()
