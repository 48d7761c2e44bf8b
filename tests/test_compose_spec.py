"""docker-compose.yml against a model of the Compose specification's keys: what
``docker compose config`` checks offline, without compose installed, and the mistakes it refuses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pytest
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    StringConstraints,
    ValidationError,
    model_validator,
)

from tests.support.compose import compose, resolved

# --- the Compose specification ---------------------------------------------------------------
#
# What `docker compose config` checks offline, without compose installed: the keys of the Compose
# specification (compose-spec.io) that this file uses, with their documented forms; an unknown key
# fails as a typo would. A key of the specification not modelled here fails too: add it, in its
# documented form, when the file starts using it.

Duration = Annotated[str, StringConstraints(pattern=r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")]
Name = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")]
Restart = Annotated[
    str, StringConstraints(pattern=r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
]
# [[HOST_IP:][PUBLISHED]:]TARGET[/PROTOCOL], ports or ranges of ports.
ShortPort = Annotated[
    str,
    StringConstraints(
        pattern=(
            r"^(?:(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:]+\]):(?:\d+(?:-\d+)?)?:|\d+(?:-\d+)?:)?"
            r"\d+(?:-\d+)?(?:/(?:tcp|udp|sctp))?$"
        )
    ),
]


def _require(condition: object, message: str) -> None:
    # A ValueError becomes a ValidationError naming where; an assert would vanish under -O.
    if not condition:
        raise ValueError(message)


VOLUME_MODES = {"ro", "rw", "z", "Z", "nocopy", "shared", "slave", "private", "rshared", "rslave"}


def _short_volume(entry: str) -> str:
    """``[SOURCE:]TARGET[:MODE]``: the target a path in the container, the modes known."""
    parts = entry.split(":")
    _require(1 <= len(parts) <= 3, f"{entry!r}: not [SOURCE:]TARGET[:MODE]")
    target = parts[0] if len(parts) == 1 else parts[1]
    _require(target.startswith("/"), f"{entry!r}: the target must be an absolute path")
    if len(parts) == 3:
        unknown = set(parts[2].split(",")) - VOLUME_MODES
        _require(not unknown, f"{entry!r}: unknown mode {sorted(unknown)}")
    return entry


ShortVolume = Annotated[str, AfterValidator(_short_volume)]


def named_volume(entry: str) -> str | None:
    """The named volume a short volume entry mounts; None for a host path or an anonymous one."""
    parts = entry.split(":")
    if len(parts) == 1 or parts[0].startswith(("/", ".", "~")):
        return None
    return parts[0]


class Spec(BaseModel):
    """An object of the specification: unknown keys are errors, except the ``x-`` extensions
    allowed on every object."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _without_extensions(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not str(k).startswith("x-")}
        return data


class Healthcheck(Spec):
    test: str | list[str]
    interval: Duration | None = None
    timeout: Duration | None = None
    start_period: Duration | None = None
    start_interval: Duration | None = None
    retries: NonNegativeInt | None = None
    disable: bool | None = None

    @model_validator(mode="after")
    def _test_form(self) -> Healthcheck:
        # A string runs in the container's shell; a list starts with how to run the rest.
        if isinstance(self.test, list):
            form, *rest = self.test or [""]
            _require(form in ("NONE", "CMD", "CMD-SHELL"), f"test starts with {form!r}")
            _require(
                bool(rest) == (form != "NONE"), f"{form} takes {'no' if rest else 'a'} command"
            )
        else:
            _require(self.test.strip(), "an empty test")
        return self


class Dependency(Spec):
    condition: Literal["service_started", "service_healthy", "service_completed_successfully"] = (
        "service_started"
    )
    restart: bool | None = None
    required: bool | None = None


class Build(Spec):
    context: str
    dockerfile: str | None = None
    args: dict[str, str | None] | list[str] | None = None
    target: str | None = None


class Port(Spec):
    target: int
    published: str | int | None = None
    host_ip: str | None = None
    protocol: Literal["tcp", "udp", "sctp"] | None = None
    mode: Literal["host", "ingress"] | None = None
    name: str | None = None
    app_protocol: str | None = None


class Mount(Spec):
    type: Literal["volume", "bind", "tmpfs", "image", "npipe", "cluster"]
    source: str | None = None
    target: str
    read_only: bool | None = None


class Limits(Spec):
    cpus: str | float | None = None
    memory: str | None = None
    pids: int | None = None


class Resources(Spec):
    limits: Limits | None = None
    reservations: Limits | None = None


class RestartPolicy(Spec):
    condition: Literal["none", "on-failure", "any"] | None = None
    delay: Duration | None = None
    max_attempts: NonNegativeInt | None = None
    window: Duration | None = None


class Deploy(Spec):
    mode: Literal["replicated", "global"] | None = None
    replicas: NonNegativeInt | None = None
    resources: Resources | None = None
    restart_policy: RestartPolicy | None = None
    labels: dict[str, str] | list[str] | None = None


class ServiceNetwork(Spec):
    aliases: list[str] | None = None
    ipv4_address: str | None = None
    ipv6_address: str | None = None


class ServiceSecret(Spec):
    source: Name
    target: str | None = None
    uid: str | None = None
    gid: str | None = None
    mode: int | None = None


EnvironmentValue = str | int | float | bool | None


class Service(Spec):
    image: str | None = None
    build: str | Build | None = None
    command: str | list[str] | None = None
    entrypoint: str | list[str] | None = None
    environment: (
        dict[str, EnvironmentValue]
        | list[Annotated[str, StringConstraints(pattern=r"^[^=\s]+(=.*)?$")]]
        | None
    ) = None
    env_file: str | list[str] | None = None
    depends_on: list[Name] | dict[Name, Dependency] | None = None
    healthcheck: Healthcheck | None = None
    ports: list[int | ShortPort | Port] | None = None
    expose: list[str | int] | None = None
    volumes: list[ShortVolume | Mount] | None = None
    networks: list[Name] | dict[Name, ServiceNetwork | None] | None = None
    init: bool | None = None
    restart: Restart | None = None
    deploy: Deploy | None = None
    stop_grace_period: Duration | None = None
    stop_signal: str | None = None
    container_name: str | None = None
    hostname: str | None = None
    user: str | None = None
    working_dir: str | None = None
    labels: dict[str, str] | list[str] | None = None
    profiles: list[str] | None = None
    secrets: list[Name | ServiceSecret] | None = None

    @model_validator(mode="after")
    def _runs_something(self) -> Service:
        _require(self.image or self.build, "a service needs an image or a build")
        return self

    def dependencies(self) -> dict[str, Dependency]:
        if isinstance(self.depends_on, list):
            return {name: Dependency() for name in self.depends_on}
        return dict(self.depends_on or {})

    def secret_names(self) -> set[str]:
        return {s.source if isinstance(s, ServiceSecret) else s for s in self.secrets or []}

    def named_volumes(self) -> set[str]:
        names = set()
        for entry in self.volumes or []:
            name = entry.source if isinstance(entry, Mount) else named_volume(entry)
            if name and (not isinstance(entry, Mount) or entry.type == "volume"):
                names.add(name)
        return names


class TopLevel(Spec):
    """A top-level volume or network."""

    name: str | None = None
    driver: str | None = None
    driver_opts: dict[str, str] | None = None
    external: bool | None = None
    labels: dict[str, str] | list[str] | None = None


class Secret(Spec):
    """A top-level secret: from a file, from a variable of compose's environment, or external."""

    file: str | None = None
    environment: str | None = None
    external: bool | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        sources = [self.file, self.environment, self.external]
        _require(sum(x is not None for x in sources) == 1, "one of file, environment, external")
        return self


class ComposeFile(Spec):
    # ``version`` is obsolete (compose only warns): left out, so it fails here.
    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]*$")] | None = None
    services: dict[Name, Service] = Field(min_length=1)
    volumes: dict[Name, TopLevel | None] | None = None
    networks: dict[Name, TopLevel | None] | None = None
    secrets: dict[Name, Secret] | None = None

    @model_validator(mode="after")
    def _references_resolve(self) -> ComposeFile:
        volumes, networks = set(self.volumes or {}), set(self.networks or {}) | {"default"}
        for name, svc in self.services.items():
            for dependency, how in svc.dependencies().items():
                _require(
                    dependency in self.services, f"{name} depends on no service {dependency!r}"
                )
                _require(dependency != name, f"{name} depends on itself")
                # Compose accepts it, but `up` then fails: the dependency never becomes healthy.
                check = self.services[dependency].healthcheck
                _require(
                    how.condition != "service_healthy" or (check and not check.disable),
                    f"{name} waits for {dependency} to be healthy, which has no healthcheck",
                )
            undeclared = svc.named_volumes() - volumes
            _require(not undeclared, f"{name} mounts undeclared volumes {sorted(undeclared)}")
            unknown = set(svc.networks or ()) - networks
            _require(not unknown, f"{name} joins undeclared networks {sorted(unknown)}")
            secrets = svc.secret_names() - set(self.secrets or {})
            _require(not secrets, f"{name} uses undeclared secrets {sorted(secrets)}")
        return self


def test_compose_file_follows_the_compose_specification() -> None:
    ComposeFile.model_validate(resolved(compose()))


def test_extension_keys_are_allowed_at_the_top_and_in_a_service() -> None:
    document = resolved(compose())
    document["x-note"] = {"anything": ["goes"]}
    document["services"]["worker"]["x-note"] = "here too"
    ComposeFile.model_validate(document)


def _set(document: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


# Mistakes the model refuses, as `docker compose config` does (or `up`, for a healthy wait on a
# service that has no healthcheck; compose only warns of `version`): where each is, and what the
# model must say of it.
EXTRA = "Extra inputs are not permitted"
PATTERN = "String should match pattern"
MISTAKES: dict[str, tuple[tuple[str, ...], Any, tuple[str | int, ...], str]] = {
    "misspelt service key": (
        ("services", "receiver", "helthcheck"),
        {"test": ["CMD", "true"]},
        ("services", "receiver", "helthcheck"),
        EXTRA,
    ),
    "misspelt top-level key": (("volume",), {}, ("volume",), EXTRA),
    "obsolete version key": (("version",), "3.8", ("version",), EXTRA),
    "misspelt deploy key": (
        ("services", "worker", "deploy"),
        {"replica": 2},
        ("services", "worker", "deploy", "replica"),
        EXTRA,
    ),
    "unknown dependency condition": (
        ("services", "worker", "depends_on", "migrate", "condition"),
        "service_complete",
        ("services", "worker", "depends_on", "migrate", "condition"),
        "Input should be 'service_started', 'service_healthy' or 'service_completed_successfully'",
    ),
    "dependency on no service": (
        ("services", "beat", "depends_on", "migrtae"),
        {"condition": "service_completed_successfully"},
        (),
        "beat depends on no service 'migrtae'",
    ),
    "healthy wait on a service without a healthcheck": (
        ("services", "receiver", "depends_on", "beat"),
        {"condition": "service_healthy"},
        (),
        "receiver waits for beat to be healthy, which has no healthcheck",
    ),
    "unknown healthcheck form": (
        ("services", "redis", "healthcheck", "test"),
        ["CMD-SHEL", "redis-cli ping"],
        ("services", "redis", "healthcheck"),
        "test starts with 'CMD-SHEL'",
    ),
    "healthcheck with nothing to run": (
        ("services", "redis", "healthcheck", "test"),
        ["CMD"],
        ("services", "redis", "healthcheck"),
        "CMD takes a command",
    ),
    "duration without a unit": (
        ("services", "redis", "healthcheck", "interval"),
        "5 seconds",
        ("services", "redis", "healthcheck", "interval"),
        PATTERN,
    ),
    "unknown restart policy": (
        ("services", "migrate", "restart"),
        "never",
        ("services", "migrate", "restart"),
        PATTERN,
    ),
    "port that is not a number": (
        ("services", "receiver", "ports"),
        ["8000:eighty"],
        ("services", "receiver", "ports", 0),
        PATTERN,
    ),
    "relative volume target": (
        ("services", "redis", "volumes"),
        ["redis-data:data"],
        ("services", "redis", "volumes", 0),
        "'redis-data:data': the target must be an absolute path",
    ),
    "undeclared named volume": (
        ("services", "redis", "volumes"),
        ["redis-dta:/data"],
        (),
        "redis mounts undeclared volumes ['redis-dta']",
    ),
    "undeclared secret": (
        ("services", "prometheus", "secrets"),
        ["ops_tokn"],
        (),
        "prometheus uses undeclared secrets ['ops_tokn']",
    ),
    "secret with two sources": (
        ("secrets", "ops_token", "file"),
        "./ops_token",
        ("secrets", "ops_token"),
        "one of file, environment, external",
    ),
    "environment value that is not a scalar": (
        ("services", "worker", "environment", "RETENTION_DAYS"),
        {"days": 30},
        ("services", "worker", "environment", "RETENTION_DAYS"),
        "Input should be a valid string",
    ),
}


def _within(expected: tuple[str | int, ...], loc: tuple[str | int, ...]) -> bool:
    """``expected`` in ``loc`` in order, skipping the names pydantic gives the members of a
    union (``dict[str,Dependency]``)."""
    rest = iter(loc)
    return all(any(part == key for part in rest) for key in expected)


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_compose_model_refuses_each_mistake(mistake: str) -> None:
    path, value, where, message = MISTAKES[mistake]
    document = _set(resolved(compose()), path, value)
    with pytest.raises(ValidationError) as refused:
        ComposeFile.model_validate(document)
    found = [(e["loc"], e["msg"]) for e in refused.value.errors()]
    assert any(_within(where, loc) and message in msg for loc, msg in found), found
