"""The node agent as a container: its config as the container sees it, its mounts, its network, its state.

When the agent runs in a container, the algorithm containers it starts are its siblings on the same engine, so
every bind mount they get must name a HOST path. The run folders live in the node's volume (`vfed-<name>-vol`,
at /var/lib/vfed inside); the runtime's `host_path_map` maps that prefix to the volume's Mountpoint. Datasets
are mounted into the agent at their own host path, so they need no mapping.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import docker.errors
import yaml
from docker import DockerClient
from docker.models.containers import Container
from docker.models.volumes import Volume
from docker.types import Mount

from vfed.node.config import NodeSettings
from vfed.node.operator.common import (
    LABEL_AGENT_NODE,
    LABEL_AGENT_SCOPE,
    LABEL_ROLE,
    ROLE_AGENT,
    OperatorError,
)
from vfed.node.operator.new import write_config
from vfed.node.operator.paths import NodeRef

DEFAULT_IMAGE = "vfed/node"
DATA_IN_CONTAINER = "/var/lib/vfed"
CONFIG_IN_CONTAINER = "/etc/vfed/node.yaml"
KEYS_IN_CONTAINER = "/etc/vfed/keys"
"""The key file's folder (read-only): a rotation replaces the file; a file mount would keep the old one."""
TRUST_IN_CONTAINER = "/etc/vfed/trust"
"""The trust store's folder, shared with `vnode trust` on the host (written by the agent in `tofu` mode)."""
PASSPHRASE_IN_CONTAINER = "/run/secrets/vfed-key-passphrase"
METRICS_TOKEN_IN_CONTAINER = "/run/secrets/vfed-metrics-token"
API_KEY_IN_CONTAINER = "/run/secrets/vfed-api-key"
SERVER_CA_IN_CONTAINER = "/etc/vfed/server-ca.pem"
"""The server's CA (`server_ca_file`), mounted read-only: not secret, but what the server is checked by."""
MQTT_CA_IN_CONTAINER = "/etc/vfed/mqtt-ca.pem"
"""The broker's CA (`mqtt_ca_file`), when it is not the server's."""
"""Secrets reach the agent as read-only files, never as environment variables: a container's environment is
in `docker inspect` for anyone who may talk to the engine, and in the agent's /proc/<pid>/environ."""
SOURCE_ROOTS = ("common", "node", "server", "proxy", "algorithms", "client")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(url: str | None) -> bool:
    """True when the URL points at this machine's loopback, which a bridged container cannot reach."""
    if not url:
        return False
    host = urlparse(url).hostname or ""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def docker_socket_path() -> str:
    """The engine's Unix socket on this machine (DOCKER_HOST when it names one)."""
    host = os.environ.get("DOCKER_HOST", "")
    return host[len("unix://") :] if host.startswith("unix://") else "/var/run/docker.sock"


def node_volume(client: DockerClient, ref: NodeRef) -> Volume:
    """The node's own volume (journal, run folders, proxy sockets), created on first use."""
    try:
        return client.volumes.get(ref.volume_name)
    except docker.errors.NotFound:
        labels = {LABEL_ROLE: ROLE_AGENT, LABEL_AGENT_NODE: ref.name, LABEL_AGENT_SCOPE: ref.scope.value}
        return client.volumes.create(ref.volume_name, labels=labels)


def mountpoint(volume: Volume) -> str:
    point = volume.attrs.get("Mountpoint")
    if not isinstance(point, str) or not point.startswith("/"):
        raise OperatorError(
            f"volume {volume.name} has no host Mountpoint (remote engine?): cannot map run folders"
        )
    return point


def agent_config(
    ref: NodeRef, settings: NodeSettings, host_mountpoint: str, secrets: Mapping[str, Path] | None = None
) -> dict[str, Any]:
    """The operator's YAML with the paths the agent sees inside its container, and the host path map; the
    secrets named by their files inside (`secret_files`), never by an environment variable."""
    raw: dict[str, Any] = yaml.safe_load(ref.config_path.read_text(encoding="utf-8"))
    raw.pop("private_key_passphrase_env", None)
    secrets = secrets or {}
    if PASSPHRASE_IN_CONTAINER in secrets:
        raw["private_key_passphrase_file"] = PASSPHRASE_IN_CONTAINER
    if METRICS_TOKEN_IN_CONTAINER in secrets:
        raw["metrics_token_file"] = METRICS_TOKEN_IN_CONTAINER
    if API_KEY_IN_CONTAINER in secrets:
        raw["api_key_file"] = API_KEY_IN_CONTAINER
    if settings.server_ca_file is not None:
        raw["server_ca_file"] = SERVER_CA_IN_CONTAINER
    if settings.mqtt_ca_file is not None:
        raw["mqtt_ca_file"] = MQTT_CA_IN_CONTAINER
    runtime = dict(raw.get("runtime") or {})
    path_map = dict(runtime.get("host_path_map") or {})
    path_map[DATA_IN_CONTAINER] = host_mountpoint
    runtime["host_path_map"] = path_map
    raw.update(
        data_dir=DATA_IN_CONTAINER,
        private_key=key_in_container(settings),
        trust_store=trust_store_in_container(settings),
        runtime=runtime,
        name=settings.name,
    )
    return raw


def key_in_container(settings: NodeSettings) -> str:
    return f"{KEYS_IN_CONTAINER}/{settings.key_path.name}"


def trust_store_in_container(settings: NodeSettings) -> str:
    return f"{TRUST_IN_CONTAINER}/{settings.trust_store_path.name}"


def key_and_trust_mounts(settings: NodeSettings) -> list[Mount]:
    """The key file's folder (read-only) and the trust store's folder (made when missing), as the agent's
    config names them: the agent sees the operator's rotations and pins as they are written."""
    trust_dir = settings.trust_store_path.resolve().parent
    trust_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return [
        Mount(KEYS_IN_CONTAINER, str(settings.key_path.resolve().parent), type="bind", read_only=True),
        Mount(TRUST_IN_CONTAINER, str(trust_dir), type="bind"),
    ]


def write_agent_config(
    ref: NodeRef, settings: NodeSettings, host_mountpoint: str, secrets: Mapping[str, Path] | None = None
) -> Path:
    """Write the container's config beside the node's data (mode 0600: it holds the API key)."""
    path = ref.data_dir / "agent.yaml"
    write_config(path, agent_config(ref, settings, host_mountpoint, secrets))
    return path


def written_passphrase(ref: NodeRef) -> Path:
    """Where `vnode start` keeps a passphrase given in an environment variable, for the agent's mount."""
    return ref.data_dir / "secrets" / "key-passphrase"


def _api_key_file(ref: NodeRef) -> Path | None:
    """The config's `api_key_file` (relative: from the config's folder), when it names the key by a file."""
    raw = yaml.safe_load(ref.config_path.read_text(encoding="utf-8"))
    given = raw.get("api_key_file") if isinstance(raw, dict) else None
    if not isinstance(given, str) or not given:
        return None
    path = Path(given)
    return (path if path.is_absolute() else ref.config_path.resolve().parent / path).resolve()


def secret_files(ref: NodeRef, settings: NodeSettings) -> dict[str, Path]:
    """The host file of each secret the agent's container gets, by its path inside: the key passphrase, the
    metrics token and the API key when the config names it by `api_key_file`.

    The key passphrase: the configured `private_key_passphrase_file`, or the value of the configured variable
    written to `written_passphrase` (0600 in a 0700 folder of the node's data, removed by `vnode stop`). It
    stays while the node runs, so that Docker can restart the agent after a reboot, as an environment variable
    would have stayed in the container's config, but out of `docker inspect`.
    """
    found: dict[str, Path] = {}
    if settings.private_key_passphrase_file is not None:
        found[PASSPHRASE_IN_CONTAINER] = settings.private_key_passphrase_file.resolve()
    elif settings.private_key_passphrase_env is not None:
        name = settings.private_key_passphrase_env
        value = os.environ.get(name)
        if not value:
            raise OperatorError(
                f"the key file needs a passphrase: set the environment variable {name} (the agent gets it "
                "as a read-only file, not as an environment variable)"
            )
        found[PASSPHRASE_IN_CONTAINER] = write_secret(written_passphrase(ref), value)
    if settings.metrics_token_file is not None:
        found[METRICS_TOKEN_IN_CONTAINER] = settings.metrics_token_file.resolve()
    key_file = _api_key_file(ref)
    if key_file is not None:
        found[API_KEY_IN_CONTAINER] = key_file
    for inside, host in found.items():
        if not host.is_file():
            raise OperatorError(f"{host} (for {inside} in the agent's container) is not a file")
    return found


def server_ca_mounts(settings: NodeSettings) -> list[Mount]:
    """The server's and the broker's CA files (read-only), those the config names."""
    mounts = []
    for key, inside in (("server_ca_file", SERVER_CA_IN_CONTAINER), ("mqtt_ca_file", MQTT_CA_IN_CONTAINER)):
        given: Path | None = getattr(settings, key)
        if given is None:
            continue
        source = given.resolve()
        if not source.is_file():
            raise OperatorError(f"{key} {source} is not a file")
        mounts.append(Mount(inside, str(source), type="bind", read_only=True))
    return mounts


def secret_mounts(secrets: Mapping[str, Path]) -> list[Mount]:
    return [Mount(inside, str(host), type="bind", read_only=True) for inside, host in secrets.items()]


def write_secret(path: Path, value: str) -> Path:
    """Write the secret to a fresh file (0600, its folder 0700), replacing any earlier one in one step."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(value)
    os.replace(tmp, path)
    return path


def forget_secrets(ref: NodeRef) -> None:
    """Remove what `secret_files` wrote (the node is stopped: nothing needs it until the next start)."""
    written_passphrase(ref).unlink(missing_ok=True)


def dataset_mounts(settings: NodeSettings) -> list[Mount]:
    """Each dataset that is a host path, and each `sql` dataset's password file, read-only at the same path
    (so the runtime needs no mapping)."""
    mounts = []
    for label, ds in settings.datasets.items():
        if ds.password_file is not None:
            if not ds.password_file.is_file():
                raise OperatorError(
                    f"invalid config: datasets.{label}.password_file: {ds.password_file} is not a file"
                )
            source = str(ds.password_file.resolve())  # a link (a mounted secret's) is followed here
            mounts.append(Mount(str(ds.password_file), source, type="bind", read_only=True))
        if "://" in ds.uri:
            continue
        if not Path(ds.uri).exists():
            raise OperatorError(f"invalid config: datasets.{label}.uri: {ds.uri} does not exist")
        mounts.append(Mount(ds.uri, ds.uri, type="bind", read_only=True))
    return mounts


def develop_mounts(client: DockerClient, image: str, source: Path) -> list[Mount]:
    """Mount each vfed package of a source tree over the one installed in the image (read-only)."""
    site = _image_site_packages(client, image)
    mounts = []
    for root in SOURCE_ROOTS:
        pkg = source / root / "vfed" / root
        if pkg.is_dir():
            mounts.append(Mount(f"{site}/vfed/{root}", str(pkg.resolve()), type="bind", read_only=True))
    if not mounts:
        raise OperatorError(
            f"--develop {source}: no vfed source tree there (expected {source}/node/vfed/node)"
        )
    return mounts


def _image_site_packages(client: DockerClient, image: str) -> str:
    probe = "import os, vfed.node as n; print(os.path.dirname(os.path.dirname(n.__path__[0])))"
    try:
        out = client.containers.run(
            image,
            ["-c", probe],
            entrypoint="python",
            remove=True,
            network_mode="none",
            # The image declares a VOLUME here; without a mount of our own the engine makes an anonymous
            # volume that `remove=True` leaves behind.
            tmpfs={DATA_IN_CONTAINER: ""},
        )
    except docker.errors.DockerException as exc:
        raise OperatorError(f"cannot find the installed vfed package in {image}: {exc}") from None
    text = out.decode().strip() if isinstance(out, bytes) else str(out).strip()
    if not text.startswith("/"):
        raise OperatorError(f"cannot find the installed vfed package in {image}")
    return text


def find_agent(client: DockerClient, ref: NodeRef) -> Container | None:
    try:
        return client.containers.get(ref.container_name)
    except docker.errors.NotFound:
        return None


def is_running(container: Container | None) -> bool:
    return container is not None and container.status in ("running", "restarting", "paused")


def log_tail(container: Container, lines: int = 20) -> str:
    try:
        raw = container.logs(tail=lines)
    except docker.errors.DockerException:
        return "(no logs)"
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text.rstrip() or "(no output)"


ONLINE_RE = re.compile(r"\bnode \S+ \(organization \S+\) (?:started|online)\b")
"""The agent's log line once it has logged in, reconciled its key and opened its runtime (vfed.node.agent)."""
