"""Tables, one module each. Alembic migrations under ``models/migrations`` make the schema."""

from models.account import ACCOUNT_KINDS, ACCOUNT_STATUSES, ROLES, Account
from models.assignment import Assignment
from models.audit import AuditRecord
from models.base import Base, utcnow
from models.class_teacher import ClassTeacher
from models.dead_letter import DeadLetter
from models.district import ADMIN_REMOVAL_POLICIES, DISTRICT_STATUSES, District
from models.district_exit import EXIT_STATUSES, DistrictExit, ExitUnit
from models.enrollment import Enrollment
from models.goal import Goal
from models.journal import JournalEntry
from models.klass import Class
from models.object_version import ObjectVersion
from models.poll_cursor import PollCursor
from models.report_access import ReportAccess
from models.roster_event import EVENT_STATUSES, FINAL_STATUSES, RosterEvent
from models.skill_progress import MASTERY_LEVELS, SkillProgress

__all__ = [
    "ACCOUNT_KINDS",
    "ACCOUNT_STATUSES",
    "ADMIN_REMOVAL_POLICIES",
    "DISTRICT_STATUSES",
    "EVENT_STATUSES",
    "EXIT_STATUSES",
    "FINAL_STATUSES",
    "MASTERY_LEVELS",
    "ROLES",
    "Account",
    "Assignment",
    "AuditRecord",
    "Base",
    "Class",
    "ClassTeacher",
    "DeadLetter",
    "District",
    "DistrictExit",
    "Enrollment",
    "ExitUnit",
    "Goal",
    "JournalEntry",
    "ObjectVersion",
    "PollCursor",
    "ReportAccess",
    "RosterEvent",
    "SkillProgress",
    "utcnow",
]
