"""The runtimes the agent has, by the `runtime.kind` that names them: each one's config model and class.

A new runtime is one module with its Runtime subclass, one config model (a RuntimeConfig subclass whose
`kind` is a Literal of its name), an entry in KINDS and a member in RuntimeSection. The node's configuration
validates its `runtime` section through RuntimeSection, so a bad key fails at start-up with its name; the
agent builds the runtime with `build`. A runtime's module is imported only when it is built: reading the
configuration does not load the Docker SDK.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Discriminator, Tag, TypeAdapter

from vfed.node.runtime.base import Runtime, RuntimeConfig
from vfed.node.runtime.docker_config import DockerRuntimeConfig
from vfed.node.runtime.kubernetes_config import KubernetesRuntimeConfig

DEFAULT_KIND = "docker"
"""The runtime of a `runtime` section that names no kind (and of a configuration without the section)."""


@dataclass(frozen=True)
class RuntimeKind:
    """One runtime: its name in `runtime.kind`, its config model, and how to import its class."""

    kind: str
    config: type[RuntimeConfig]
    load: Callable[[], type[Runtime]]
    offered: bool = True
    """Whether `vnode new` offers it: only a runtime the agent is known to start runs with."""


def _docker() -> type[Runtime]:
    from vfed.node.runtime.docker import DockerRuntime

    return DockerRuntime


def _kubernetes() -> type[Runtime]:
    from vfed.node.runtime.kubernetes import KubernetesRuntime

    return KubernetesRuntime


KINDS: dict[str, RuntimeKind] = {
    entry.kind: entry
    for entry in (
        RuntimeKind("docker", DockerRuntimeConfig, _docker),
        RuntimeKind("kubernetes", KubernetesRuntimeConfig, _kubernetes),
    )
}


class UnknownRuntime(ValueError):
    """A runtime kind no entry of KINDS names."""


def _kind_of(section: Any) -> str | None:
    """The section's kind (the default when it names none); None, which pydantic reports as the
    `unknown_runtime` error, for a kind that is not in KINDS or a section that is not a mapping."""
    if isinstance(section, RuntimeConfig):
        kind: Any = section.kind
    elif isinstance(section, dict):
        kind = section.get("kind", DEFAULT_KIND)
    else:
        return None
    return kind if isinstance(kind, str) and kind in KINDS else None


RuntimeSection = Annotated[
    Annotated[DockerRuntimeConfig, Tag("docker")] | Annotated[KubernetesRuntimeConfig, Tag("kubernetes")],
    Discriminator(
        _kind_of,
        custom_error_type="unknown_runtime",
        custom_error_message=f"unknown runtime (known: {', '.join(KINDS)})",
    ),
]
"""The `runtime` section: the config model of the runtime its `kind` names (a discriminated union; one member
per entry of KINDS, each tagged with its kind)."""


_SECTION: TypeAdapter[RuntimeSection] = TypeAdapter(RuntimeSection)


def default_config() -> RuntimeSection:
    """The section of a configuration that has none: the default runtime with its defaults."""
    return _SECTION.validate_python({})


def build(config: RuntimeConfig, data_dir: Path) -> Runtime:
    """The runtime a validated section names, not yet opened (no I/O)."""
    entry = KINDS.get(config.kind)
    if entry is None or not isinstance(config, entry.config):
        raise UnknownRuntime(f"runtime.kind: unknown runtime {config.kind!r} (known: {', '.join(KINDS)})")
    return entry.load().from_config(config, data_dir)
