"""The lock files (requirements/) that `make install`, CI and the image install from: exact,
hash-checked versions within pyproject.toml's ranges, for every dependency it names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)", re.MULTILINE)


def pinned(lock: str) -> dict[str, str]:
    text = (ROOT / "requirements" / lock).read_text()
    return {canonicalize_name(name): version for name, version in PIN.findall(text)}


@pytest.mark.parametrize(
    ("lock", "requirements"),
    [
        ("runtime.txt", PYPROJECT["dependencies"]),
        ("dev.txt", PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["dev"]),
    ],
)
def test_lock_pins_every_dependency_within_its_range(lock: str, requirements: list[str]) -> None:
    versions = pinned(lock)
    for line in requirements:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in versions, f"{lock} does not pin {name}: run `make lock`"
        assert requirement.specifier.contains(versions[name], prereleases=True), (
            f"{lock} pins {name}=={versions[name]}, outside {requirement.specifier}: `make lock`"
        )


@pytest.mark.parametrize("lock", ["runtime.txt", "dev.txt"])
def test_every_pin_is_exact_and_hash_checked(lock: str) -> None:
    text = (ROOT / "requirements" / lock).read_text()
    entries = [e for e in re.split(r"\n(?=[A-Za-z0-9])", text) if PIN.match(e)]
    assert len(entries) == len(pinned(lock)) > 10
    for entry in entries:
        assert "--hash=sha256:" in entry, f"{entry.splitlines()[0]} has no hash"
    # Machine-specific index options would make the file install only here.
    assert "--index-url" not in text and "--find-links" not in text


def test_the_runtime_lock_holds_no_dev_tool() -> None:
    runtime, dev = pinned("runtime.txt"), pinned("dev.txt")
    for tool in ("pytest", "mypy", "ruff", "hypothesis", "import-linter"):
        assert tool not in runtime and tool in dev
    assert set(runtime) <= set(dev)
    assert {name: dev[name] for name in runtime} == runtime, "the two locks disagree on a version"
