"""The example-isd fixture (shared/fixtures/example-isd.json) and its people, by name."""

from __future__ import annotations

import copy
import json
from typing import Any

from tests.conftest import FIXTURES

EXAMPLE = FIXTURES / "example-isd.json"
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
