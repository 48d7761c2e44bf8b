"""The example district and its people, by name: the one copy of ``example-isd.json`` that the
package ships for ``grassroots demo`` (``worker/demo_data/``); ``tests/fixtures/example-isd.md``
says what each scenario must make of it."""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

EXAMPLE = resources.files("worker") / "demo_data" / "example-isd.json"
DISTRICT = "5b2a6f0c8e9d7a0011223344"
PAT = "5f8e2c1a9b7d4e0012ab0001"
RIVERA = "5f8e2c1a9b7d4e0012ab0002"
KIM = "5f8e2c1a9b7d4e0012ab0003"
STEVE = "58c81dcea3627927150003ed"
MARIA = "58c81dcea3627927150003ee"
LEO = "58c81dcea3627927150003ef"
SAM = "acct-sam-taylor"
S1 = "60a1b2c3d4e5f60718293a01"
S2 = "60a1b2c3d4e5f60718293a02"
S3 = "60a1b2c3d4e5f60718293a03"
PEOPLE = [PAT, RIVERA, KIM, STEVE, MARIA, LEO, SAM]


def example(policy: str = "convert") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(EXAMPLE.read_text())
    data = copy.deepcopy(data)
    data["districts"][0]["policy"]["admin_removal"] = policy
    return data


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for item in items]


def _known_ids(data: dict[str, Any]) -> set[str]:
    found = {d["id"] for d in data["districts"]} | {u["id"] for u in data["users"]}
    found |= {s["id"] for s in data["sections"]}
    for key in ("accounts", "classes", "goals", "assignments"):
        found |= {item["id"] for item in data["platform"][key]}
    return found


class Copy:
    """The example roster with every id rewritten for one test, so tests can share a stack
    without seeing each other's people."""

    def __init__(self, tag: str, policy: str = "convert") -> None:
        assert len(tag) == 4 and all(c in "0123456789abcdef" for c in tag)
        self.tag = tag
        original = example(policy)
        mapping = {old: self._new(old) for old in _known_ids(original)}
        self.data: dict[str, Any] = _rewrite(original, mapping)

    def _new(self, old: str) -> str:
        return self.tag + old[4:] if len(old) == 24 else f"{self.tag}-{old}"

    def __call__(self, old: str) -> str:
        """The copy's id for an id of the original file."""
        return self._new(old)


def _rewrite(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _rewrite(v, mapping) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(v, mapping) for v in node]
    if isinstance(node, str):
        return mapping.get(node, node)
    return node
