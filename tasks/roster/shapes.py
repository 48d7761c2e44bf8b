"""The shapes of the district mirror's input: Clever v3 ``User`` and ``Section`` objects (from a
roster snapshot or a roster event), and the roster snapshot of ``grassroots seed`` (SPEC §5.1).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models import CLEVER_ROLE_NAMES, AdminRemoval, Mastery, Role, platform_roles
from tasks.errors import GrassrootsError
from tasks.storable import STORABLE_TEXT

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
ID_MAX_LENGTH = 64
Id = Annotated[str, Field(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
# Free text, as long as the columns that keep it allow, and storable (``tasks.storable``): a
# NUL or a lone surrogate is refused here, with its field named, not by the database.
NamePart = Annotated[str, Field(max_length=200, pattern=STORABLE_TEXT)]
Email = Annotated[str, Field(max_length=320, pattern=STORABLE_TEXT)]
Title = Annotated[str, Field(min_length=1, max_length=500, pattern=STORABLE_TEXT)]
Label = Annotated[str, Field(min_length=1, max_length=200, pattern=STORABLE_TEXT)]


class SnapshotError(GrassrootsError):
    """The snapshot is malformed; the message names the bad record. Nothing was written."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class CleverName(_Record):
    first: NamePart | None = None
    middle: NamePart | None = None
    last: NamePart | None = None

    def full(self) -> str | None:
        return " ".join(p for p in (self.first, self.last) if p) or None


class CleverUser(_Record):
    id: Id
    district: Id
    email: Email | None = None
    name: CleverName | None = None
    # Each role's own fields under its key, for the roles of Clever's five (``CleverRole``) the
    # user holds. Keyed by text, which compares equal to the enum's members: no enum to build per
    # user of a 100k-student district.
    roles: dict[str, dict[str, Any] | None]

    @field_validator("roles", mode="before")
    @classmethod
    def _known_roles(cls, roles: Any) -> Any:
        if not isinstance(roles, dict):
            return roles  # the type check names the problem
        if not roles:
            raise ValueError("a user needs at least one role")
        if roles.keys() <= CLEVER_ROLE_NAMES:
            return roles
        # A role Clever adds later is ignored, whatever its fields look like (SPEC §4).
        return {name: fields for name, fields in roles.items() if name in CLEVER_ROLE_NAMES}

    @property
    def clever_roles(self) -> list[str]:
        """Its Clever roles, sorted: what the mirror keeps."""
        return sorted(self.roles)

    @property
    def platform_roles(self) -> frozenset[Role]:
        return platform_roles(self.roles)

    @property
    def holds_platform_role(self) -> bool:
        """It has (or gets) a district account; a staff member or a contact only a mirror row."""
        return bool(platform_roles(self.roles))


class CleverSection(_Record):
    id: Id
    district: Id
    name: Title
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
    name: Title
    policy: Policy = Policy()


class PlatformAccount(_Record):
    id: Id
    email: Email | None = None
    name: Annotated[str, Field(max_length=500, pattern=STORABLE_TEXT)] | None = None
    # Role's values, spelled out: a Literal of the enum's members would name them in its
    # message as "<Role.TEACHER: 'teacher'>".
    roles: list[Literal["teacher", "student"]] = Field(min_length=1)


class PlatformClass(_Record):
    id: Id
    name: Title
    teacher: Id
    students: list[Id] = []


class ClassItem(_Record):
    """Something a teacher created in one class."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    id: Id
    class_id: Id = Field(alias="class")
    created_by: Id | None = None


class PlatformGoal(ClassItem):
    course: Label


class PlatformAssignment(ClassItem):
    title: Title


class Progress(_Record):
    user: Id
    skill: Label
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
