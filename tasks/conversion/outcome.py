"""What a conversion, a class drop or a restore changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    """What a unit of work changed."""

    converted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    classes_removed: list[str] = field(default_factory=list)
    # Links stamped removed one by one; those a district exit hides with their class are not.
    links_removed: int = 0
    journal_entries: int = 0

    def merge(self, other: Outcome) -> Outcome:
        self.converted += other.converted
        self.unchanged += other.unchanged
        self.classes_removed += other.classes_removed
        self.links_removed += other.links_removed
        self.journal_entries += other.journal_entries
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "converted": len(self.converted),
            "unchanged": len(self.unchanged),
            "classes_removed": len(self.classes_removed),
            "links_removed": self.links_removed,
            "journal_entries": self.journal_entries,
        }


@dataclass
class RestoreResult:
    subject: str
    entries: int = 0
    links_restored: int = 0
    accounts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "entries": self.entries,
            "links_restored": self.links_restored,
            "accounts": self.accounts,
        }
