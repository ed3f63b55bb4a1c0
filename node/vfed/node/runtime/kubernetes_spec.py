"""The objects of one Kubernetes run, as plain data (no API calls): the Job, its Secret, its NetworkPolicy,
and the job's claim. Everything the algorithm can touch is listed here; the API server validates the bodies.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from vfed.node.runtime.base import (
    CONTAINER_RUN_DIR,
    LABEL_JOB_ID,
    LABEL_NODE,
    LABEL_RUN_ID,
    PROXY_SOCKET_DIR,
    TEMPORARY_FOLDER,
    RunSpec,
    container_name,
    dataset_path,
    job_volume_name,
)
from vfed.node.runtime.kubernetes_config import KubernetesRuntimeConfig

Body = dict[str, Any]
PROXY_TOKEN_DIR = "/run/vfed-token"
PROXY_TOKEN_FILE = f"{PROXY_TOKEN_DIR}/token"
"""Where a run's proxy token appears in its pod (PROXY_TOKEN_FILE in its environment)."""
LABEL_KIND = "vfed.kind"


def object_name(name: str) -> str:
    """A DNS-1123 label for a vfed name: '_' and '.' become '-'; a name too long keeps a hash of itself."""
    clean = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    if len(clean) <= 63 and clean == name:
        return clean
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{clean[:52].rstrip('-')}-{digest}"


def job_name(spec_node: str, run_id: str) -> str:
    return object_name(container_name(spec_node, run_id))


def claim_name(node_name: str, job_id: str) -> str:
    return object_name(job_volume_name(node_name, job_id))


def run_labels(spec: RunSpec) -> dict[str, str]:
    own = {LABEL_NODE: spec.node_name, LABEL_RUN_ID: spec.run_id, LABEL_JOB_ID: spec.job_id}
    return {**spec.labels, **own}


def _meta(name: str, labels: dict[str, str]) -> Body:
    return {"name": name, "labels": labels}


def secret_body(spec: RunSpec) -> Body | None:
    """The run's proxy token, readable only by its own pod; None when the run has no token."""
    if spec.proxy_token is None:
        return None
    labels = {**run_labels(spec), LABEL_KIND: "run-secret"}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(job_name(spec.node_name, spec.run_id), labels),
        "type": "Opaque",
        "stringData": {"token": spec.proxy_token.get_secret_value()},
    }


def network_policy_body(spec: RunSpec, config: KubernetesRuntimeConfig) -> Body:
    """No ingress at all; egress only to the proxy's pods on its port (and the cluster DNS when allowed)."""
    egress: list[Body] = []
    if config.proxy_service is not None and spec.proxy_token is not None:
        peers: list[Body] = [{"podSelector": {"matchLabels": dict(config.proxy_pod_labels)}}]
        peers += [{"ipBlock": {"cidr": block}} for block in config.proxy_ip_blocks]
        egress.append({"to": peers, "ports": [{"port": config.listen_port, "protocol": "TCP"}]})
        if config.allow_dns:
            dns = {"kubernetes.io/metadata.name": "kube-system"}
            egress.append(
                {
                    "to": [
                        {
                            "namespaceSelector": {"matchLabels": dns},
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }
                    ],
                    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
                }
            )
    selector = {LABEL_NODE: spec.node_name, LABEL_RUN_ID: spec.run_id}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(
            job_name(spec.node_name, spec.run_id), {**run_labels(spec), LABEL_KIND: "run-policy"}
        ),
        "spec": {
            "podSelector": {"matchLabels": selector},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }


def claim_body(node_name: str, job_id: str, config: KubernetesRuntimeConfig) -> Body:
    spec: Body = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(config.job_storage_bytes)}},
    }
    if config.job_storage_class is not None:
        spec["storageClassName"] = config.job_storage_class
    labels = {LABEL_NODE: node_name, LABEL_JOB_ID: job_id, LABEL_KIND: "job-tmp"}
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(claim_name(node_name, job_id), labels),
        "spec": spec,
    }


def _volumes(spec: RunSpec, config: KubernetesRuntimeConfig) -> tuple[list[Body], list[Body]]:
    """(pod volumes, container mounts): run folder, job claim, /tmp, socket folder, token, datasets."""
    run: Body = {"name": "run", "hostPath": {"path": config.to_host_path(spec.run_dir), "type": "Directory"}}
    run_mount: Body = {"name": "run", "mountPath": CONTAINER_RUN_DIR}
    if config.run_claim is not None:
        run = {"name": "run", "persistentVolumeClaim": {"claimName": config.run_claim.claim}}
        run_mount["subPath"] = config.run_claim.sub_path(spec.run_dir)
    volumes: list[Body] = [
        run,
        {"name": "job-tmp", "persistentVolumeClaim": {"claimName": claim_name(spec.node_name, spec.job_id)}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": str(config.tmpfs_bytes)}},
    ]
    mounts: list[Body] = [
        run_mount,
        {"name": "job-tmp", "mountPath": TEMPORARY_FOLDER},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.proxy_socket is not None:
        folder = config.to_host_path(spec.proxy_socket.rsplit("/", 1)[0])
        volumes.append({"name": "proxy-socket", "hostPath": {"path": folder, "type": "Directory"}})
        mounts.append({"name": "proxy-socket", "mountPath": PROXY_SOCKET_DIR, "readOnly": True})
    if spec.proxy_token is not None:
        secret = job_name(spec.node_name, spec.run_id)
        volumes.append({"name": "proxy-token", "secret": {"secretName": secret, "defaultMode": 0o440}})
        mounts.append({"name": "proxy-token", "mountPath": PROXY_TOKEN_DIR, "readOnly": True})
    for i, dataset in enumerate(spec.datasets):
        name = f"dataset-{i}"
        source = config.dataset_sources.get(dataset.label)
        mount: Body = {"name": name, "mountPath": dataset_path(dataset.label), "readOnly": True}
        if source is not None and source.claim is not None:
            volumes.append(
                {"name": name, "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True}}
            )
            if source.sub_path is not None:
                mount["subPath"] = source.sub_path
        else:
            path = source.host_path if source is not None and source.host_path else dataset.host_path
            volumes.append({"name": name, "hostPath": {"path": config.to_host_path(path), "type": "File"}})
        mounts.append(mount)
    return volumes, mounts


def _environment(spec: RunSpec, config: KubernetesRuntimeConfig) -> list[Body]:
    env = {"HOME": "/tmp", **spec.env}
    if spec.proxy_token is not None:
        env["PROXY_TOKEN_FILE"] = PROXY_TOKEN_FILE
        if config.proxy_service is not None:
            host = f"{config.proxy_service}.{config.namespace}.svc"
            env["PROXY_URL"] = f"http://{host}:{config.proxy_port}"
    return [{"name": k, "value": v} for k, v in env.items()]


def _resources(spec: RunSpec, config: KubernetesRuntimeConfig) -> Body:
    memory = spec.limits.memory_bytes or config.memory_bytes
    cpus = spec.limits.nano_cpus or config.nano_cpus
    amounts = {"memory": str(memory), "cpu": f"{max(1, cpus // 1_000_000)}m"}
    if config.gpus:
        amounts[config.gpu_resource] = str(config.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def job_body(spec: RunSpec, image: str, config: KubernetesRuntimeConfig) -> Body:
    """The hardened Job of one run; `image` is `name@sha256:...`, the digest the policy allowed."""
    labels = run_labels(spec)
    volumes, mounts = _volumes(spec, config)
    seccomp = {"type": "RuntimeDefault"}
    container: Body = {
        "name": "run",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": _environment(spec, config),
        "resources": _resources(spec, config),
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.uid,
            "runAsGroup": config.gid,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": seccomp,
        },
    }
    if spec.command is not None:
        container["command"] = list(spec.command)
    job_spec: Body = {
        "backoffLimit": 0,
        "ttlSecondsAfterFinished": config.ttl_after_finished_s,
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": config.termination_grace_s,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": config.uid,
                    "runAsGroup": config.gid,
                    "fsGroup": config.gid,
                    "seccompProfile": seccomp,
                },
                "containers": [container],
                "volumes": volumes,
            },
        },
    }
    if config.active_deadline_s is not None:
        job_spec["activeDeadlineSeconds"] = config.active_deadline_s
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(job_name(spec.node_name, spec.run_id), labels),
        "spec": job_spec,
    }
