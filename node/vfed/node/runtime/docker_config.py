"""The Docker runtime's own settings: the node configuration's `runtime` section when `kind: docker`.

Apart from the runtime (docker_spec, docker): the node's configuration is read without the Docker SDK.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from vfed.node.runtime.base import RuntimeConfig, check_host_path_map, map_host_path

MIB = 1024 * 1024


class DockerRuntimeConfig(RuntimeConfig):
    """Node-level settings of the Docker runtime; the limits are defaults a RunSpec may override."""

    kind: Literal["docker"] = "docker"

    base_url: str | None = Field(default=None, description="Docker endpoint; None reads DOCKER_HOST etc.")
    memory_bytes: int = Field(default=1024 * MIB, gt=0, description="Memory limit of a run's container.")
    nano_cpus: int = Field(default=1_000_000_000, gt=0, description="CPU limit, in 1e-9 CPUs (1e9: one CPU).")
    pids_limit: int = Field(default=256, gt=0, description="Processes a run's container may have at once.")
    tmpfs_bytes: int = Field(default=64 * MIB, gt=0, description="Size of the noexec tmpfs at /tmp.")
    uid: int = Field(default=10001, gt=0, description="Unprivileged user the algorithm runs as (never 0).")
    gid: int = Field(default=10001, gt=0, description="Group the algorithm runs as (never 0).")
    log_max_bytes: int = Field(default=10 * MIB, gt=0, description="json-file log cap per container.")
    pull_missing: bool = Field(
        default=False,
        description="Pull an image that is not present locally (only names the node's allowed_images admit "
        "by name). Off by default: a pull contacts whatever registry the task's image name points at.",
    )
    max_waiters: int = Field(default=64, gt=0, description="Threads kept for concurrent wait() calls.")
    jobs_dir: str | None = Field(
        default=None,
        description="Agent-owned folder for the jobs' temporary folders (the agent sets <data_dir>/jobs); "
        "None: a private folder under the system's temporary folder.",
    )
    host_path_map: dict[str, str] = Field(
        default_factory=dict,
        description="Path prefix as the agent sees it -> the same path on the Docker host. Needed when the "
        "agent runs in a container: bind mounts of sibling containers name host paths.",
    )

    @field_validator("host_path_map")
    @classmethod
    def _absolute_prefixes(cls, v: dict[str, str]) -> dict[str, str]:
        return check_host_path_map(v)

    def to_host_path(self, local_path: str) -> str:
        """Translate a path the agent sees into the path the Docker host sees (longest prefix wins)."""
        return map_host_path(self.host_path_map, local_path)
