"""Tables, one module each. Alembic migrations under ``models/migrations`` make the schema."""

from models.account import ROLE_COLUMNS, Account, role_flags, roles_of
from models.assignment import Assignment
from models.audit import AuditRecord
from models.base import Base, utcnow
from models.class_teacher import ClassTeacher
from models.console_session import ConsoleSession
from models.dead_letter import DeadLetter
from models.district import District
from models.district_exit import DistrictExit, ExitUnit
from models.enrollment import Enrollment
from models.enums import (
    CLEVER_ROLE_NAMES,
    AccountKind,
    AccountStatus,
    AdminRemoval,
    AuditAction,
    CleverRole,
    DeadLetterReason,
    DistrictStatus,
    EventStatus,
    ExitStatus,
    JournalKind,
    Mastery,
    OperatorRole,
    PollStatus,
    RequestKind,
    RequestStatus,
    Role,
    SyncStatus,
    UnitKind,
    UnitStatus,
    clever_role,
    platform_roles,
)
from models.goal import Goal
from models.heartbeat import Heartbeat
from models.journal import JournalEntry
from models.klass import Class
from models.object_version import ObjectVersion
from models.operator import Operator
from models.operator_request import OperatorRequest
from models.pause import Pause
from models.poll_cursor import PollCursor
from models.report_access import ReportAccess
from models.roster_event import RosterEvent
from models.roster_sync import RosterSync
from models.roster_user import RosterUser
from models.skill_progress import SkillProgress
from models.task_attempt import TaskAttempt

__all__ = [
    "CLEVER_ROLE_NAMES",
    "ROLE_COLUMNS",
    "Account",
    "AccountKind",
    "AccountStatus",
    "AdminRemoval",
    "Assignment",
    "AuditAction",
    "AuditRecord",
    "Base",
    "Class",
    "ClassTeacher",
    "CleverRole",
    "ConsoleSession",
    "DeadLetter",
    "DeadLetterReason",
    "District",
    "DistrictExit",
    "DistrictStatus",
    "Enrollment",
    "EventStatus",
    "ExitStatus",
    "ExitUnit",
    "Goal",
    "Heartbeat",
    "JournalEntry",
    "JournalKind",
    "Mastery",
    "ObjectVersion",
    "Operator",
    "OperatorRequest",
    "OperatorRole",
    "Pause",
    "PollCursor",
    "PollStatus",
    "ReportAccess",
    "RequestKind",
    "RequestStatus",
    "Role",
    "RosterEvent",
    "RosterSync",
    "RosterUser",
    "SkillProgress",
    "SyncStatus",
    "TaskAttempt",
    "UnitKind",
    "UnitStatus",
    "clever_role",
    "platform_roles",
    "role_flags",
    "roles_of",
    "utcnow",
]
