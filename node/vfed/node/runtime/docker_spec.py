"""The hardened container definition of one run, as plain data (no engine calls): easy to read and test.

Everything the algorithm can touch is listed here: the run folder, the job's temporary volume, the run's proxy
socket and the declared datasets (read-only). Nothing else from the host, and no network.
"""

from __future__ import annotations

import os
import stat
from pathlib import PurePosixPath
from typing import Any

from docker.types import LogConfig, Mount

from vfed.node.runtime.base import (
    CONTAINER_RUN_DIR,
    JOB_VOLUME_MOUNT,
    LABEL_JOB_ID,
    LABEL_NODE,
    LABEL_RUN_ID,
    PROXY_SOCKET,
    PROXY_SOCKET_DIR,
    PermanentStartError,
    RunSpec,
    container_name,
    dataset_path,
    job_volume_name,
)
from vfed.node.runtime.docker_config import DockerRuntimeConfig


def check_local_paths(spec: RunSpec) -> None:
    """Fail early, with a clear reason, when the run folder or the proxy socket is missing or wrong."""
    if not os.path.isdir(spec.run_dir):
        raise PermanentStartError(f"run_dir {spec.run_dir} is not a folder")
    if spec.proxy_socket is not None:
        try:
            mode = os.stat(spec.proxy_socket).st_mode
        except OSError as exc:
            raise PermanentStartError(f"proxy socket {spec.proxy_socket}: {exc.strerror}") from exc
        if not stat.S_ISSOCK(mode):
            raise PermanentStartError(f"proxy socket {spec.proxy_socket} is not a Unix socket")
        _check_socket_folder(spec.proxy_socket)


def _check_socket_folder(socket_path: str) -> None:
    """The container gets the socket's whole folder (read-only): it must hold the socket and nothing else."""
    folder, name = os.path.split(socket_path)
    expected = PurePosixPath(PROXY_SOCKET).name
    if name != expected:
        raise PermanentStartError(f"proxy socket {socket_path} must be named {expected}")
    others = sorted(set(os.listdir(folder)) - {name})
    if others:
        raise PermanentStartError(
            f"proxy socket folder {folder} is mounted into the run and must hold only the socket; "
            f"it also holds {', '.join(others[:5])}"
        )


def grant_container_user(spec: RunSpec, config: DockerRuntimeConfig) -> None:
    """Let the container's user write the run folder and connect to the proxy socket.

    As root we hand the folder to that user; otherwise we open its mode (its parent, the agent's data folder,
    keeps other host users out). The socket must be writable to be connected to.
    """
    if os.geteuid() == 0:
        os.chown(spec.run_dir, config.uid, config.gid)
        os.chmod(spec.run_dir, 0o700)
        for name in os.listdir(spec.run_dir):
            os.chown(os.path.join(spec.run_dir, name), config.uid, config.gid, follow_symlinks=False)
    else:
        os.chmod(spec.run_dir, 0o777)
        for name in os.listdir(spec.run_dir):
            path = os.path.join(spec.run_dir, name)
            if os.path.isfile(path) and not os.path.islink(path):
                os.chmod(path, 0o644)
    if spec.proxy_socket is not None:
        os.chmod(spec.proxy_socket, 0o666)
        os.chmod(os.path.dirname(spec.proxy_socket), 0o755)  # mounted as is: the container user must enter


def run_labels(spec: RunSpec) -> dict[str, str]:
    own = {LABEL_NODE: spec.node_name, LABEL_RUN_ID: spec.run_id, LABEL_JOB_ID: spec.job_id}
    return {**spec.labels, **own}


def run_mounts(spec: RunSpec, config: DockerRuntimeConfig) -> list[Mount]:
    """The only host paths the container sees."""
    mounts = [
        Mount(CONTAINER_RUN_DIR, config.to_host_path(spec.run_dir), type="bind", read_only=False),
        Mount(JOB_VOLUME_MOUNT, job_volume_name(spec.node_name, spec.job_id), type="volume", no_copy=True),
    ]
    if spec.proxy_socket is not None:
        # The folder, not the socket file: a bind mount of a file keeps the old inode, so a socket bound
        # again at the same path by a restarted agent would never reach a run that is still going.
        folder = os.path.dirname(spec.proxy_socket)
        mounts.append(Mount(PROXY_SOCKET_DIR, config.to_host_path(folder), type="bind", read_only=True))
    mounts.extend(
        Mount(dataset_path(d.label), config.to_host_path(d.host_path), type="bind", read_only=True)
        for d in spec.datasets
    )
    return mounts


def container_kwargs(spec: RunSpec, config: DockerRuntimeConfig) -> dict[str, Any]:
    """Keyword arguments for `containers.create`: the hardened definition of one run."""
    memory = spec.limits.memory_bytes or config.memory_bytes
    return {
        "image": spec.image,
        "command": spec.command,
        "name": container_name(spec.node_name, spec.run_id),
        "hostname": "vfed-run",
        "environment": {"HOME": "/tmp", **spec.env},
        "labels": run_labels(spec),
        "user": f"{config.uid}:{config.gid}",
        "mounts": run_mounts(spec, config),
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={config.tmpfs_bytes}"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "privileged": False,
        "ipc_mode": "private",
        "pids_limit": spec.limits.pids_limit or config.pids_limit,
        "mem_limit": memory,
        "memswap_limit": memory,  # no swap: a memory bomb is killed, not slowed to a crawl
        "nano_cpus": spec.limits.nano_cpus or config.nano_cpus,
        "init": True,  # a real PID 1: reaps zombies, forwards SIGTERM on kill
        "log_config": LogConfig(
            type=LogConfig.types.JSON, config={"max-size": str(config.log_max_bytes), "max-file": "1"}
        ),
        "detach": True,
    }
