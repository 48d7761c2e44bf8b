"""Conversion metrics are labelled by role and outcome from the journal's rule."""

from __future__ import annotations

import pytest

from worker.metrics import _outcome


@pytest.mark.parametrize(
    ("rule", "labels"),
    [
        ("student", ("student", "converted")),
        ("admin+teacher:remove", ("admin+teacher", "converted")),
        ("admin:remove", ("admin", "removed")),
        ("admin:convert", ("admin", "converted")),
        ("lost:admin", ("admin", "role_removed")),
        ("lost:student+teacher", ("student+teacher", "role_removed")),
    ],
)
def test_conversion_rules_map_to_role_and_outcome(rule: str, labels: tuple[str, str]) -> None:
    assert _outcome(rule) == labels
