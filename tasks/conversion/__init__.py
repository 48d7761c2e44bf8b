"""The conversion rules of SPEC §3.

Every public function takes a session and ids, does its work with set-based SQL inside the
caller's transaction, and returns what it did. None of them commits: the caller's session scope
does, so a failure anywhere (including the learner-data invariant) leaves nothing half-applied.

How removal works: a district-owned row (class, teacher link, enrollment, goal, assignment, report
grant) is never deleted by a conversion. Its ``removed_by`` is set to the journal entry that
removed it, which hides it at once; ``restore`` sets it back to NULL, and ``purge`` deletes it after
the retention window. A second run finds nothing live to remove and writes no journal entry.

- ``rules``: what an account becomes (a role's conversion, a role's loss);
- ``apply``: carrying plans out for one account or a batch;
- ``classes``: district classes leaving (deleted, shrunk, orphaned);
- ``invariant``: the learner-data checksum;
- ``journal``: soft removal and the audit rows;
- ``restore``: restore and purge.
"""

from tasks.conversion.apply import apply_plans, convert_account, convert_accounts, lose_roles
from tasks.conversion.classes import drop_class, drop_classes, shrink_section
from tasks.conversion.invariant import learner_checksums
from tasks.conversion.outcome import Outcome, RestoreResult
from tasks.conversion.restore import give_back_regained, purge, restore
from tasks.conversion.rules import AccountState, Plan, full_conversion, role_loss

__all__ = [
    "AccountState",
    "Outcome",
    "Plan",
    "RestoreResult",
    "apply_plans",
    "convert_account",
    "convert_accounts",
    "drop_class",
    "drop_classes",
    "full_conversion",
    "give_back_regained",
    "learner_checksums",
    "lose_roles",
    "purge",
    "restore",
    "role_loss",
    "shrink_section",
]
