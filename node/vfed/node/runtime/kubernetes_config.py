"""The Kubernetes runtime's own settings: the node configuration's `runtime` section when `kind: kubernetes`.

Apart from the runtime (kubernetes.py): the node's configuration is read without the `kubernetes` client.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

from vfed.node.runtime.base import RuntimeConfig, check_host_path_map, map_host_path

MIB = 1024 * 1024
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class DatasetSource(BaseModel):
    """Where a dataset's file lives for the cluster: a PersistentVolumeClaim (and the file's path inside it),
    or a path on the cluster's nodes. Exactly one of the two."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    claim: str | None = Field(default=None, description="PersistentVolumeClaim holding the dataset.")
    sub_path: str | None = Field(default=None, description="The dataset's file inside that claim.")
    host_path: str | None = Field(
        default=None, description="Absolute path of the file on the cluster's nodes."
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSource:
        if (self.claim is None) == (self.host_path is None):
            raise ValueError("a dataset source names either claim or host_path")
        if self.host_path is not None and not self.host_path.startswith("/"):
            raise ValueError("host_path must be absolute")
        if self.sub_path is not None and (self.claim is None or self.sub_path.startswith("/")):
            raise ValueError("sub_path is a relative path inside claim")
        return self


class RunClaim(BaseModel):
    """A PersistentVolumeClaim the agent has mounted too: run folders made under `agent_path` reach pods
    through it (as a subPath), so the agent need not share a node's disk."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    claim: str = Field(description="The claim, in the runtime's namespace (ReadWriteMany across nodes).")
    agent_path: str = Field(description="Where the agent sees that claim; the agent's run folders go here.")

    @field_validator("agent_path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("agent_path must be absolute")
        return v

    def sub_path(self, run_dir: str) -> str | None:
        """The run folder's path inside the claim; None when it is not under agent_path."""
        path, root = PurePosixPath(run_dir), PurePosixPath(self.agent_path)
        return str(path.relative_to(root)) if root in path.parents else None


def is_loopback(host: str) -> bool:
    """A host name or address that stays on this machine (plain HTTP to it crosses no network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RegistryEndpoint(BaseModel):
    """How to reach one registry named in image references (its host[:port] is the key of `registries`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(
        default=None,
        description="Base URL of its API (the part before /v2/); None: https://<host>, or http://<host> for "
        "a loopback host.",
    )
    ca_file: str | None = Field(
        default=None, description="PEM file of the CA(s) its TLS certificate is checked against."
    )
    insecure: bool = Field(
        default=False,
        description="Allow a plain-http `url` to a host that is not loopback (manifests are still checked "
        "against their digests; credentials would cross the network in the clear).",
    )

    @model_validator(mode="after")
    def _http_only_when_allowed(self) -> RegistryEndpoint:
        if self.url is None:
            return self
        url = URL(self.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("registry url must be http(s)://host[:port]")
        if url.scheme == "http" and not self.insecure and not is_loopback(url.host):
            raise ValueError("a plain-http registry url needs `insecure: true` unless its host is loopback")
        return self


class KubernetesRuntimeConfig(RuntimeConfig):
    """Node-level settings of the Kubernetes runtime; the limits are defaults a RunSpec may override."""

    kind: Literal["kubernetes"] = "kubernetes"

    namespace: str = Field(default="vfed", description="Namespace of the runs' Jobs, Secrets and claims.")
    kubeconfig: str | None = Field(
        default=None,
        description="Path of a kubeconfig; None: the in-cluster service account (the agent runs in a pod).",
    )
    context: str | None = Field(default=None, description="The kubeconfig's context; None: its current one.")
    image_source: Literal["registry", "engine"] = Field(
        default="registry",
        description="Where the node reads an image's digest and labels: `registry` (the OCI distribution API "
        "of the registry the cluster pulls from; pods name the image `registry/name@sha256:<manifest "
        "digest>`), or `engine` (a Docker engine the cluster's nodes share, see image_engine_url; pods name "
        "it `name@sha256:<image ID>`).",
    )
    default_registry: str = Field(
        default="docker.io",
        description="Registry (host[:port]) of image names without one (`vfed/base`); docker.io adds "
        "`library/` to one-part names, as Docker does.",
    )
    registries: dict[str, RegistryEndpoint] = Field(
        default_factory=dict,
        description="Registry host[:port], as image references name it -> how to reach it (url, ca_file, "
        "insecure). A registry not named here is reached at https://<host> (http for a loopback host).",
    )
    registry_credentials_file: str | None = Field(
        default=None,
        description="A Docker config.json (`auths`: host -> `auth` or username/password, as `docker login` "
        "or a dockerconfigjson pull secret holds them): basic credentials, sent to a registry that asks "
        "(Basic challenge) or to its token service (Bearer challenge).",
    )
    image_platform: str = Field(
        default="linux/amd64",
        description="os/architecture[/variant] of the cluster's nodes: the image picked from a "
        "multi-platform index, whose digest pods then name.",
    )
    registry_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one registry request.")
    image_engine_url: str | None = Field(
        default=None,
        description="(image_source: engine) Docker endpoint holding the images the cluster runs; None reads "
        "DOCKER_HOST etc.",
    )
    proxy_service: str | None = Field(
        default=None,
        description="The node proxy's Service in `namespace`: a run given a proxy token reaches it as "
        "PROXY_URL, and its NetworkPolicy lets it reach only that. None: runs have no way out.",
    )
    proxy_port: int = Field(default=8080, gt=0, lt=65536, description="The proxy Service's port.")
    proxy_listen_host: str = Field(
        default="0.0.0.0",
        description="Address the agent's proxy listener binds (where the Service sends runs' requests; "
        "each request must carry its run's token).",
    )
    proxy_listen_port: int | None = Field(
        default=None,
        gt=0,
        lt=65536,
        description="Port of the agent's proxy listener (the Service's targetPort); None: proxy_port.",
    )
    proxy_ip_blocks: list[str] = Field(
        default_factory=list,
        description="CIDRs of an agent outside the cluster (its Service has no selector; an "
        "EndpointSlice names the agent's address): runs' NetworkPolicy lets them reach these too, on the "
        "listener's port. Empty: only the pods of proxy_pod_labels.",
    )
    proxy_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "vfed-proxy"},
        description="Labels of the proxy's pods: the only egress a run's NetworkPolicy allows.",
    )
    allow_dns: bool = Field(
        default=True,
        description="Let runs ask the cluster's DNS (kube-system, port 53) for the proxy's name.",
    )
    memory_bytes: int = Field(
        default=1024 * MIB, gt=0, description="Memory request and limit of a run's pod."
    )
    nano_cpus: int = Field(default=1_000_000_000, gt=0, description="CPU request and limit, in 1e-9 CPUs.")
    gpu_resource: str = Field(default="nvidia.com/gpu", description="Extended resource name of a GPU.")
    gpus: int = Field(default=0, ge=0, description="GPUs each run requests (0: none).")
    tmpfs_bytes: int = Field(default=64 * MIB, gt=0, description="Size of the in-memory folder at /tmp.")
    uid: int = Field(default=10001, gt=0, description="Unprivileged user the algorithm runs as (never 0).")
    gid: int = Field(default=10001, gt=0, description="Group (and fsGroup) the algorithm runs as (never 0).")
    active_deadline_s: int | None = Field(
        default=None, gt=0, description="activeDeadlineSeconds of every run's Job; None: no deadline."
    )
    ttl_after_finished_s: int = Field(
        default=3600, ge=0, description="ttlSecondsAfterFinished: the cluster deletes a finished run's Job."
    )
    termination_grace_s: int = Field(
        default=10, ge=0, description="Pods' terminationGracePeriodSeconds when the cluster stops them."
    )
    unschedulable_wait_s: float = Field(
        default=300.0, ge=0, description="How long a run's pod may stay unschedulable before the run ends."
    )
    poll_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="`wait` watches a run's pods; it also reads the run's state this often, in case a watch "
        "stalls without the connection breaking.",
    )
    job_storage_class: str | None = Field(
        default=None, description="StorageClass of the per-job temporary claims; None: the cluster's default."
    )
    job_storage_bytes: int = Field(default=1024 * MIB, gt=0, description="Size of each per-job claim.")
    dataset_sources: dict[str, DatasetSource] = Field(
        default_factory=dict,
        description="Dataset label -> its claim or node path; a dataset not named here is mounted from the "
        "path the node's configuration gives it (through host_path_map), which needs the agent and the "
        "pods on the same machine.",
    )
    run_claim: RunClaim | None = Field(
        default=None,
        description="The claim run folders reach pods through; None: as host paths (see host_path_map).",
    )
    host_path_map: dict[str, str] = Field(
        default_factory=dict,
        description="Path prefix as the agent sees it -> the same path on the cluster's nodes. Without "
        "run_claim, run folders reach pods as host paths: the agent must share the node's disk.",
    )
    max_waiters: int = Field(default=64, gt=0, description="Threads kept for the client's blocking calls.")

    @field_validator("namespace")
    @classmethod
    def _namespace_ok(cls, v: str) -> str:
        if not _DNS_LABEL.match(v):
            raise ValueError("namespace must be a DNS label (lowercase letters, digits, '-')")
        return v

    @field_validator("proxy_ip_blocks")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for block in v:
            try:
                ipaddress.ip_network(block)
            except ValueError:
                raise ValueError(f"proxy_ip_blocks: {block!r} is not a CIDR (e.g. 192.0.2.10/32)") from None
        return v

    @property
    def listen_port(self) -> int:
        """The port the agent's proxy listener binds, which runs' NetworkPolicy opens."""
        return self.proxy_listen_port if self.proxy_listen_port is not None else self.proxy_port

    @field_validator("image_platform")
    @classmethod
    def _platform_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?", v):
            raise ValueError("image_platform is os/architecture[/variant], e.g. linux/amd64")
        return v

    @field_validator("default_registry")
    @classmethod
    def _registry_host_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]+)?|\[[0-9a-fA-F:]+\](:[0-9]+)?", v):
            raise ValueError("default_registry is a host[:port], without a scheme or path")
        return v

    @field_validator("host_path_map")
    @classmethod
    def _absolute_prefixes(cls, v: dict[str, str]) -> dict[str, str]:
        return check_host_path_map(v)

    def to_host_path(self, local_path: str) -> str:
        """The path the cluster's nodes see for one the agent sees (longest prefix wins)."""
        return map_host_path(self.host_path_map, local_path)
