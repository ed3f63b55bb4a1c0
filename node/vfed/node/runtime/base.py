"""The runtime boundary: what the agent asks of a container runtime, and nothing more.

A runtime only runs containers. Policy, crypto and server I/O stay in the agent; the runtime's errors say what
the agent should do (`RuntimeUnavailable`: retry later, `PermanentStartError`: fail the run, `NotFound` on
kill/cleanup: already gone, which is success).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator

# Paths inside the algorithm container. The agent puts these in the algorithm's environment
# (INPUT_FILE, OUTPUT_FILE, TEMPORARY_FOLDER, DATASET_<LABEL>_URI, PROXY_SOCKET); every runtime mounts there.
CONTAINER_RUN_DIR = "/mnt/run"
"""The run's own folder (RunSpec.run_dir), read-write: holds `input`, the algorithm writes `output`."""
INPUT_FILE = f"{CONTAINER_RUN_DIR}/input"
OUTPUT_FILE = f"{CONTAINER_RUN_DIR}/output"
JOB_VOLUME_MOUNT = "/mnt/job"
"""Where the job volume is mounted; its root stays root's, so the algorithm cannot replace `tmp`."""
TEMPORARY_FOLDER = f"{JOB_VOLUME_MOUNT}/tmp"
"""The job's folder in that volume, owned by the container user, shared only by runs of the same job."""
DATASETS_ROOT = "/mnt/data"
"""Each dataset is mounted read-only at DATASETS_ROOT/<label> (a file, as on the host)."""
PROXY_SOCKET_DIR = "/run/vfed"
"""The run's own socket folder, mounted read-only: a restarted agent's new socket shows up in it."""
PROXY_SOCKET = f"{PROXY_SOCKET_DIR}/proxy.sock"
"""The run's own Unix socket to the proxy; the container has no network at all."""

INPUT_NAME = "input"
"""The input's name in the run folder (vfed.node.run_folder writes it; every runtime mounts the folder)."""
OUTPUT_NAME = "output"
"""The output's name in the run folder (vfed.node.run_folder reads it, never trusting what it is)."""

LABEL_NODE = "vfed.node"
LABEL_RUN_ID = "vfed.run_id"
LABEL_JOB_ID = "vfed.job_id"
LABEL_AGENT = "vfed.agent"
"""The agent instance (its journal) that started a run: another agent with the same node name leaves it be."""

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def _label_ok(label: str) -> str:
    if not _LABEL_RE.match(label):
        raise ValueError("dataset label must be letters, digits, '_' or '-' (at most 63)")
    return label


DatasetLabel = Annotated[str, AfterValidator(_label_ok)]
"""A dataset's label as runtimes use it (a container path and environment names are made from it)."""
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def dataset_path(label: str) -> str:
    """Where the dataset with this label appears inside the container."""
    return f"{DATASETS_ROOT}/{label}"


def extracted_name(label: str) -> str:
    """The file, in the run folder, of a dataset the node extracted for the run (a `sql` dataset, as
    Parquet): the run folder's mount brings it into the container, in every runtime."""
    return f"dataset-{label}.parquet"


class VfedRuntimeError(Exception):
    """Base of the runtime's errors."""


class RuntimeUnavailable(VfedRuntimeError):
    """The engine cannot be reached or is busy; the same call may work later."""


class PermanentStartError(VfedRuntimeError):
    """The run cannot start as specified (no such image, bad mount, bad spec); retrying will not help."""


class NotFound(VfedRuntimeError):
    """No container for this handle (never started, or already cleaned up)."""


class DatasetMount(BaseModel):
    """A dataset the run may read, mounted read-only at `dataset_path(label)`."""

    model_config = ConfigDict(frozen=True)

    label: DatasetLabel
    host_path: str = Field(description="Absolute path on the machine running the agent (see host_path_map).")
    type: str = Field(
        description="one of vfed.node.config.DATASET_TYPES (csv, parquet, sqlite, sql): the algorithm's "
        "DATASET_<LABEL>_TYPE"
    )

    @field_validator("host_path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("dataset host_path must be absolute")
        return v

    @property
    def container_path(self) -> str:
        return dataset_path(self.label)


class ExtractedDataset(BaseModel):
    """A dataset the node wrote into the run folder before the start (`extracted_name`; a `sql` table or
    query as Parquet): the container reads it through the run folder's mount, so no runtime mounts anything
    for it; only the algorithm's environment names it."""

    model_config = ConfigDict(frozen=True)

    label: DatasetLabel
    type: str = "parquet"

    @property
    def container_path(self) -> str:
        return f"{CONTAINER_RUN_DIR}/{extracted_name(self.label)}"


class RunLimits(BaseModel):
    """Per-run resource limits; None takes the runtime config's default."""

    model_config = ConfigDict(frozen=True)

    memory_bytes: int | None = Field(default=None, gt=0)
    nano_cpus: int | None = Field(default=None, gt=0, description="1e9 = one CPU")
    pids_limit: int | None = Field(default=None, gt=0)


class RunSpec(BaseModel):
    """Everything a runtime needs to start one run. Built by the agent after every policy check passed."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    job_id: str
    node_name: str
    organization_id: str
    image: str
    env: dict[str, str] = Field(default_factory=dict, description="The algorithm's environment, as given.")
    run_dir: str = Field(description="Host folder with the `input` file; mounted read-write at /mnt/run.")
    datasets: list[DatasetMount] = Field(default_factory=list)
    proxy_socket: str | None = Field(
        default=None,
        description="Host path of this run's proxy Unix socket, named proxy.sock, alone in its own folder "
        "(the folder is what the container gets: a socket bound there again after a restart is reachable).",
    )
    proxy_token: SecretStr | None = Field(
        default=None,
        description="The run's own credential to the proxy, for runtimes whose runs reach it over the "
        "network (Kubernetes: a Secret mounted into the run's pod only); Docker's runs use the socket.",
    )
    limits: RunLimits = Field(default_factory=RunLimits)
    labels: dict[str, str] = Field(default_factory=dict, description="Extra container labels.")
    command: list[str] | None = Field(default=None, description="Overrides the image's CMD (tests, tools).")

    @field_validator("run_id", "job_id", "node_name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        # These end up in container and volume names: keep them to what Docker and Kubernetes accept.
        if not _NAME_RE.match(v):
            raise ValueError("must be lowercase letters, digits, '_', '.' or '-' (at most 63)")
        return v

    @field_validator("run_dir")
    @classmethod
    def _run_dir_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("run_dir must be absolute")
        return v


class ExitStatus(BaseModel):
    """How a run ended, or that it had not ended when `wait` gave up."""

    exit_code: int | None = Field(description="None while still running (timed_out) or when unknown.")
    oom_killed: bool = False
    timed_out: bool = Field(default=False, description="wait's timeout passed; the container was NOT killed.")
    reason: str | None = Field(default=None, description="A short human reason when not a clean exit 0.")

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not self.oom_killed and not self.timed_out


class RunState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


class RunHandleInfo(BaseModel):
    """A container found by label, e.g. after the agent restarted."""

    run_id: str
    job_id: str
    handle: str
    state: RunState
    exit_code: int | None = None
    oom_killed: bool = False
    agent_id: str | None = Field(default=None, description="The LABEL_AGENT label; None on older containers.")


class RuntimeConfig(BaseModel):
    """A runtime's own settings, the node configuration's `runtime` section: each runtime's config model
    subclasses this one, narrowing `kind` to its own name (vfed.node.runtime.registry chooses by it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(
        description="The runtime that runs algorithm containers; the section's other keys are that runtime's "
        "own."
    )


def check_host_path_map(mapping: dict[str, str]) -> dict[str, str]:
    """A runtime's `host_path_map` (a path prefix as the agent sees it -> the same place as the machine that
    runs the containers sees it): both sides absolute, else ValueError (for a pydantic validator)."""
    for local, host in mapping.items():
        if not (local.startswith("/") and host.startswith("/")):
            raise ValueError(f"host_path_map entries must be absolute paths: {local!r} -> {host!r}")
    return mapping


def map_host_path(mapping: dict[str, str], local_path: str) -> str:
    """`local_path` as the machine that runs the containers sees it, by `mapping` (longest prefix wins)."""
    path = PurePosixPath(local_path)
    best: tuple[int, str] | None = None
    for local, host in mapping.items():
        prefix = PurePosixPath(local)
        if path == prefix or prefix in path.parents:
            depth = len(prefix.parts)
            if best is None or depth > best[0]:
                best = (depth, str(PurePosixPath(host) / path.relative_to(prefix)))
    return best[1] if best else str(path)


StepHook = Callable[[str], None]
"""Told each step of a run's start as it happens, possibly from a runtime's worker thread."""

START_STEPS = ("runtime_start", "runtime_ready", "create_sent", "create_answered", "start_sent")
"""The steps a runtime tells its `on_step` hook, in the order a `start` passes them (`create` and
`start_created` pass their share): the entry into start, the run's local setup done, the create request
sent and answered, the start request sent. The agent's start timeline (vfed.node.timeline) records them."""


class Runtime(abc.ABC):
    """A container runtime. Methods are safe to call concurrently for different handles.

    No I/O in the constructor; `async with runtime:` (or `open()`/`close()`) connects and disconnects.
    """

    name: str = "abstract"

    on_step: StepHook | None = None
    """Set by the agent to follow a run's start (START_STEPS) without the runtime knowing the agent."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: RuntimeConfig, data_dir: Path) -> Self:
        """The runtime for the node's validated `runtime` section (of this runtime's own config model);
        `data_dir` is the agent's folder, where a runtime keeps files of its own."""

    def step(self, name: str) -> None:
        """Tell the hook a step of a start (one of START_STEPS); any thread may call it."""
        if self.on_step is not None:
            self.on_step(name)

    async def open(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Connect to the engine; raises RuntimeUnavailable when it does not answer."""

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release the engine connection. Containers keep running."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def start(self, spec: RunSpec) -> str:
        """Create and start the run's container (and its job volume if needed); return an opaque handle.

        Returns as soon as the container is started. Raises PermanentStartError or RuntimeUnavailable.
        Starting a run whose container already exists raises PermanentStartError (see list_runs).
        """

    proxy_over_network: bool = False
    """Whether runs reach the node's proxy over a network, each with a token of its own (RunSpec.proxy_token),
    instead of a Unix socket of their own (RunSpec.proxy_socket)."""

    def proxy_listen_address(self) -> tuple[str, int] | None:
        """Where the agent's proxy listener must listen for runs that reach it over a network (host, port);
        None when runs get no way out over the network (a socket runtime, or none configured)."""
        return None

    async def proxy_token(self, handle: str) -> SecretStr | None:
        """The proxy token a started run holds (RunSpec.proxy_token), read back from where the runtime keeps
        it for the run: an agent that restarted serves a still-running run's proxy under it again. None when
        the runtime keeps none or the run's is gone."""
        return None

    creates_ahead: bool = False
    """Whether `create` and `start_created` work: a container can be made while the run's checks go on."""

    async def create(self, spec: RunSpec) -> str:
        """Create the run's container (and its job volume if needed) without starting it; its handle.

        Nothing runs until `start_created`; `cleanup` removes it. The run folder and the proxy socket's
        folder must exist (the socket itself may come later). Only when `creates_ahead`.
        """
        raise NotImplementedError(f"the {self.name} runtime cannot create a container ahead of its start")

    async def start_created(self, handle: str, spec: RunSpec) -> None:
        """Start a container `create` made for this spec, after the same local checks as `start`.

        A container that fails to start is removed. Raises PermanentStartError or RuntimeUnavailable.
        """
        raise NotImplementedError(f"the {self.name} runtime cannot create a container ahead of its start")

    @abc.abstractmethod
    async def wait(self, handle: str, timeout_s: float | None = None) -> ExitStatus:
        """Wait for the run to end. After timeout_s, return timed_out=True without killing anything."""

    @abc.abstractmethod
    async def kill(self, handle: str, grace_s: float = 10.0) -> None:
        """Stop the run: SIGTERM, then SIGKILL after grace_s. The container stays for logs and exit code.

        NotFound is not raised: a run that is gone is killed.
        """

    @abc.abstractmethod
    async def logs(self, handle: str, max_bytes: int = 64 * 1024) -> str:
        """The tail of the run's stdout+stderr, at most max_bytes (UTF-8, undecodable bytes replaced)."""

    @abc.abstractmethod
    async def cleanup(self, handle: str) -> None:
        """Remove the run's container (killing it if needed). Idempotent: a missing container is fine."""

    @abc.abstractmethod
    async def list_runs(self, node_name: str) -> list[RunHandleInfo]:
        """Every run container of this node, running or exited (found by label, not by memory)."""

    @abc.abstractmethod
    async def image_digest(self, image: str, *, pull: bool = True) -> str:
        """The image's content digest ("sha256:..."), pulling it if absent (only with `pull` and when the
        runtime pulls at all); PermanentStartError if neither. The caller checked the node's image rules on
        the name first (policy.image_gate): this is the first engine call about the image."""

    @abc.abstractmethod
    async def image_labels(self, image: str) -> dict[str, str]:
        """The labels of an image present here (an ID from `image_digest`): the node reads the algorithm's
        manifest from them. Never pulls; PermanentStartError when the image is not present."""

    @abc.abstractmethod
    async def ensure_job_volume(self, node_name: str, job_id: str) -> str:
        """Create the job's temporary volume if missing; return its name. Idempotent."""

    @abc.abstractmethod
    async def remove_job_volume(self, node_name: str, job_id: str) -> None:
        """Remove the job's temporary volume. Missing is fine; in use by a run raises RuntimeUnavailable."""

    @abc.abstractmethod
    async def list_job_volumes(self, node_name: str) -> list[str]:
        """Job ids that have a temporary volume on this node (for retention after a restart)."""


def container_name(node_name: str, run_id: str) -> str:
    return f"vfed-{node_name}-run-{run_id}"


def job_volume_name(node_name: str, job_id: str) -> str:
    return f"vfed-{node_name}-{job_id}-tmp"


def algorithm_env(
    *,
    run_id: str,
    job_id: str,
    organization_id: str,
    datasets: Sequence[DatasetMount | ExtractedDataset],
    with_proxy: bool,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The standard algorithm environment (docs/algorithms.md) for the container paths above: each dataset,
    mounted or extracted into the run folder, by its path inside the container."""
    env = {
        "INPUT_FILE": INPUT_FILE,
        "OUTPUT_FILE": OUTPUT_FILE,
        "TEMPORARY_FOLDER": TEMPORARY_FOLDER,
        "RUN_ID": run_id,
        "JOB_ID": job_id,
        "ORGANIZATION_ID": organization_id,
        "DATASETS": ",".join(d.label for d in datasets),
    }
    for d in datasets:
        key = re.sub(r"[^A-Za-z0-9]", "_", d.label).upper()
        env[f"DATASET_{key}_URI"] = d.container_path
        env[f"DATASET_{key}_TYPE"] = d.type
    if with_proxy:
        env["PROXY_SOCKET"] = PROXY_SOCKET
    env.update(extra or {})
    return env
