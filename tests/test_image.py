"""The Dockerfile and .dockerignore (SPEC §7), held to the files ``pip install .`` needs.

Docker is not needed: the image's build stage is replayed by building a wheel from exactly the
files the Dockerfile copies.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.compose import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


# --- the image -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile() -> list[Instruction]:
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for entry in logical:
        keyword, _, arguments = entry.strip().partition(" ")
        out.append(Instruction(keyword.upper(), arguments.strip()))
    return out


def stages() -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in dockerfile():
        if instruction.keyword == "FROM":
            result.append([])
        result[-1].append(instruction)
    return result


def test_image_is_python_311_slim_running_grassroots_as_a_non_root_user() -> None:
    instructions = dockerfile()
    bases = [i.arguments.split()[0] for i in instructions if i.keyword == "FROM"]
    assert bases and all(base == "python:3.11-slim" for base in bases), bases
    final = stages()[-1]
    users = [i.arguments for i in final if i.keyword == "USER"]
    assert users, "the image runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    entrypoints = [i.arguments for i in final if i.keyword == "ENTRYPOINT"]
    assert json.loads(entrypoints[-1]) == ["grassroots"]


def test_image_installs_its_dependencies_from_the_runtime_lock_before_the_project() -> None:
    build = next(s for s in stages() if any("pip install ." in i.arguments for i in s))
    runs = [i.arguments for i in build if i.keyword == "RUN"]
    copies = [i.arguments.split() for i in build if i.keyword == "COPY"]
    locked = next(n for n, run in enumerate(runs) if "-r requirements/runtime.txt" in run)
    assert "--require-hashes" in runs[locked]
    # The project goes in on top, without resolving anything again.
    project = next(n for n, run in enumerate(runs) if "pip install ." in run)
    assert locked < project and "--no-deps" in runs[project]
    assert ["requirements/runtime.txt", "requirements/runtime.txt"] in copies
    assert in_build_context("requirements/runtime.txt")


def _ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """``.dockerignore`` as (re-include, pattern) pairs, in order: the last match wins."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip().lstrip("/"))
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", pattern):
            if token == "**/":
                regex += "(?:.*/)?"
            elif token == "**":
                regex += ".*"
            elif token == "*":
                regex += "[^/]*"
            elif token == "?":
                regex += "[^/]"
            elif token.startswith("["):
                regex += token
            else:
                regex += re.escape(token)
        rules.append((include, re.compile(regex)))
    return rules


def in_build_context(relative: str) -> bool:
    """Docker's rule: a pattern that matches a path or any of its parent directories counts."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for include, regex in _ignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = include
    return included


def test_build_context_leaves_out_local_state_secrets_and_caches() -> None:
    for path in (
        ".venv/bin/python",
        "var/grassroots.db",
        "var/ops-token",
        ".env",
        ".git/config",
        "tests/conftest.py",
        "worker/__pycache__/api.cpython-311.pyc",
        "requirements/dev.txt",
    ):
        assert not in_build_context(path), path
    for path in (
        "pyproject.toml",
        "README.md",
        "requirements/runtime.txt",
        "worker/cli/__init__.py",
        "models/migrations/env.py",
    ):
        assert in_build_context(path), path


def _copy_into(source: str, destination: Path) -> None:
    """One ``COPY source dest`` of the build, from the build context: a directory's contents, or
    a file."""
    source = posixpath.normpath(source)
    assert in_build_context(source), f"COPY {source}: .dockerignore leaves it out of the context"
    origin = ROOT / source
    if origin.is_file():
        target = destination / origin.name if destination.is_dir() else destination
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, target)
        return
    assert origin.is_dir(), f"COPY {source}: no such file or directory"
    for path in sorted(origin.rglob("*")):
        relative = path.relative_to(ROOT).as_posix()
        if path.is_file() and in_build_context(relative):
            target = destination / path.relative_to(origin)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def replay_build_stage(into: Path) -> Path:
    """Lay out the build stage's WORKDIR as its COPY instructions would; return it."""
    build = next(s for s in stages() if any("pip install ." in i.arguments for i in s))
    workdir = "/"
    for instruction in build:
        if instruction.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, instruction.arguments)
            (into / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword in ("COPY", "ADD"):
            assert instruction.keyword == "COPY", "ADD fetches and unpacks: use COPY"
            words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
            *sources, dest = words
            target = into / posixpath.join(workdir, dest).lstrip("/")
            if dest.endswith("/") or len(sources) > 1:
                target.mkdir(parents=True, exist_ok=True)
            for source in sources:
                _copy_into(source, target)
    return into / workdir.lstrip("/")


@pytest.mark.slow
def test_image_installs_from_exactly_the_files_it_copies(tmp_path: Path) -> None:
    source = replay_build_stage(tmp_path / "image")
    wheels = tmp_path / "wheels"
    # The same isolated PEP 517 build `pip install .` does in the image (not the editable install
    # the tests run on, which would find the work tree's files whether they were copied or not).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = wheels.glob("grassroots-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "grassroots = worker.cli:main" in archive.read(entry_points).decode()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    readme = (ROOT / "README.md").read_text().strip().splitlines()
    assert readme[-1] in metadata.decode(), "the image was built without README.md"
    for package in ("worker", "tasks", "models"):
        for module in (ROOT / package).rglob("*.py"):
            assert str(module.relative_to(ROOT)) in names, f"the image lacks {module}"
    migrations = ROOT / "models" / "migrations"
    for path in [
        *migrations.glob("*.py"),
        *migrations.glob("*.mako"),
        *migrations.glob("versions/*.py"),
    ]:
        assert str(path.relative_to(ROOT)) in names, f"`grassroots db upgrade` would lack {path}"
