"""Pod spec -> Docker container definition, the way a kubelet with a container runtime would map it.

Plain data in, plain data out (the caller has already looked up Secrets, claims and the image), so each rule
can be read beside the Kubernetes field it implements. `Waiting` carries the container state a real kubelet
would report when it cannot start the container yet.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docker.types import Mount
from fakek8s_core import quantity

Obj = dict[str, Any]


class Waiting(Exception):
    """The container cannot start (yet): reported as `state.waiting {reason, message}`, pod Pending."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class PodInputs:
    """What the kubelet looked up in the store for one pod."""

    secrets: dict[str, Obj]  # name -> Secret
    claim_paths: dict[str, str]  # claim name -> its Docker volume's folder on the host
    image_id: str
    image_user: str
    secret_dir: Path  # this pod's folder for Secret volume files
    network: str | None
    hosts: dict[str, str] = field(default_factory=dict)  # Service DNS names -> an endpoint's address


def effective_user(pod: Obj, container: Obj, image_user: str) -> str:
    """The user the container runs as: container securityContext over pod securityContext over the image."""
    psc = pod["spec"].get("securityContext") or {}
    csc = container.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    if uid is None:
        return image_user if gid is None else f"{image_user.split(':', 1)[0] or 0}:{gid}"
    return f"{uid}:{gid}" if gid is not None else str(uid)


def check_non_root(pod: Obj, container: Obj, user: str) -> None:
    """runAsNonRoot: the kubelet refuses to start a container that would run as root (or cannot tell)."""
    psc = pod["spec"].get("securityContext") or {}
    csc = container.get("securityContext") or {}
    if not csc.get("runAsNonRoot", psc.get("runAsNonRoot", False)):
        return
    where = (
        f'(pod: "{pod["metadata"]["name"]}_{pod["metadata"]["namespace"]}({pod["metadata"]["uid"]})", '
        + (f"container: {container['name']})")
    )
    uid = user.split(":", 1)[0]
    if uid in ("", "0", "root"):
        raise Waiting(
            "CreateContainerConfigError", f"container has runAsNonRoot and image will run as root {where}"
        )
    if not uid.isdigit():
        raise Waiting(
            "CreateContainerConfigError",
            f"container has runAsNonRoot and image has non-numeric user ({uid}), cannot verify user is "
            "non-root " + where,
        )


def secret_value(inputs: PodInputs, name: str, key: str, optional: bool) -> bytes | None:
    secret = inputs.secrets.get(name)
    if secret is None:
        if optional:
            return None
        raise Waiting("CreateContainerConfigError", f'secret "{name}" not found')
    data = secret.get("data") or {}
    if key not in data:
        if optional:
            return None
        raise Waiting(
            "CreateContainerConfigError",
            f"couldn't find key {key} in Secret {secret['metadata']['namespace']}/{name}",
        )
    return base64.b64decode(data[key])


def environment(pod: Obj, container: Obj, inputs: PodInputs) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "valueFrom" not in item:
            env[item["name"]] = item.get("value", "")
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = secret_value(inputs, ref["name"], ref["key"], bool(ref.get("optional")))
            if value is not None:
                env[item["name"]] = value.decode()
        elif "fieldRef" in source:
            env[item["name"]] = _field_ref(pod, source["fieldRef"]["fieldPath"])
        else:
            raise Waiting(
                "CreateContainerConfigError", f"fakek8s: valueFrom {sorted(source)} is not implemented"
            )
    return env


def _field_ref(pod: Obj, path: str) -> str:
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
    }
    if path in simple:
        return str(simple[path])
    if path.startswith("metadata.labels['") and path.endswith("']"):
        return str((meta.get("labels") or {}).get(path[17:-2], ""))
    if path == "spec.nodeName":
        return str(pod["spec"].get("nodeName", ""))
    raise Waiting("CreateContainerConfigError", f"fakek8s: fieldRef {path} is not implemented")


def security_options(pod: Obj, container: Obj) -> dict[str, Any]:
    """securityContext -> Docker options. seccomp RuntimeDefault is Docker's default profile."""
    psc = pod["spec"].get("securityContext") or {}
    csc = container.get("securityContext") or {}
    options: dict[str, Any] = {"security_opt": []}
    if csc.get("readOnlyRootFilesystem"):
        options["read_only"] = True
    caps = csc.get("capabilities") or {}
    if caps.get("drop"):
        options["cap_drop"] = list(caps["drop"])
    if caps.get("add"):
        options["cap_add"] = list(caps["add"])
    if csc.get("allowPrivilegeEscalation") is False:
        options["security_opt"].append("no-new-privileges")
    if csc.get("privileged"):
        options["privileged"] = True
    seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        options["security_opt"].append("seccomp=unconfined")
    elif seccomp != "RuntimeDefault":
        raise Waiting("CreateContainerConfigError", f"fakek8s: seccompProfile {seccomp} is not implemented")
    groups = [str(g) for g in psc.get("supplementalGroups") or []]
    if psc.get("fsGroup") is not None:
        groups.append(str(psc["fsGroup"]))
    if groups:
        options["group_add"] = groups
    return options


def resource_limits(container: Obj) -> dict[str, Any]:
    """limits.memory -> mem_limit (and no swap, as on a node without swap); limits.cpu -> nano_cpus."""
    limits = (container.get("resources") or {}).get("limits") or {}
    options: dict[str, Any] = {}
    if "memory" in limits:
        options["mem_limit"] = options["memswap_limit"] = int(quantity(limits["memory"]))
    if "cpu" in limits:
        options["nano_cpus"] = int(quantity(limits["cpu"]) * 1_000_000_000)
    return options


def _write_secret_volume(volume: Obj, inputs: PodInputs, fs_group: int | None) -> Path:
    """The Secret's keys as files (defaultMode / items[].mode); with an fsGroup the files belong to that
    group and gain group read (as the kubelet's volume ownership rule does for read-only volumes)."""
    source = volume["secret"]
    target = inputs.secret_dir / str(volume["name"])
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o755)
    secret = inputs.secrets.get(source.get("secretName", ""))
    if secret is None:
        if source.get("optional"):
            return target
        raise Waiting(
            "ContainerCreating",
            f'MountVolume.SetUp failed for volume "{volume["name"]}" : '
            f'secret "{source.get("secretName")}" not found',
        )
    data = secret.get("data") or {}
    default_mode = int(source.get("defaultMode", 0o644))
    items = source.get("items") or [{"key": key, "path": key} for key in data]
    for item in items:
        if item["key"] not in data:
            raise Waiting(
                "ContainerCreating",
                f'MountVolume.SetUp failed for volume "{volume["name"]}" : '
                f"references non-existent secret key: {item['key']}",
            )
        path = target / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data[item["key"]]))
        mode = int(item.get("mode", default_mode))
        if fs_group is not None:
            os.chown(path, 0, fs_group)
            mode |= 0o440
        path.chmod(mode)
    return target


def mounts(pod: Obj, container: Obj, inputs: PodInputs) -> tuple[list[Mount], dict[str, str]]:
    """volumeMounts -> Docker mounts: PVC -> its Docker volume's folder, Secret -> read-only bind of files,
    hostPath -> bind, emptyDir -> tmpfs (mode 0777, sizeLimit as its size)."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    out: list[Mount] = []
    tmpfs: dict[str, str] = {}
    for vm in container.get("volumeMounts") or []:
        volume = volumes[vm["name"]]
        target, sub = vm["mountPath"], vm.get("subPath", "")
        read_only = bool(vm.get("readOnly"))
        if "persistentVolumeClaim" in volume:
            # The claim's Docker volume is bind-mounted by its host folder: the container then holds no
            # reference to the volume, so deleting the claim can remove the volume while a finished pod (and
            # its logs) stays, as on a cluster. subPath works the same way.
            claim = volume["persistentVolumeClaim"]["claimName"]
            read_only = read_only or bool(volume["persistentVolumeClaim"].get("readOnly"))
            host = Path(inputs.claim_paths[claim]) / sub
            if not host.exists():  # a subPath naming a file in the claim mounts that file, as a kubelet does
                host.mkdir(parents=True)
            out.append(Mount(target, str(host), type="bind", read_only=read_only))
        elif "secret" in volume:
            fs_group = (pod["spec"].get("securityContext") or {}).get("fsGroup")
            folder = _write_secret_volume(volume, inputs, fs_group)
            out.append(Mount(target, str(folder / sub if sub else folder), type="bind", read_only=True))
        elif "hostPath" in volume:
            out.append(Mount(target, _host_path(volume, sub), type="bind", read_only=read_only))
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit")
            tmpfs[target] = "mode=777" + (f",size={int(quantity(size))}" if size else "")
        else:
            kinds = sorted(k for k in volume if k != "name")
            raise Waiting("ContainerCreating", f"fakek8s: volume source {kinds} is not implemented")
    return out, tmpfs


def _host_path(volume: Obj, sub: str) -> str:
    source = volume["hostPath"]
    path = Path(source["path"])
    kind = source.get("type", "")
    if kind == "DirectoryOrCreate":
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "Directory" and not path.is_dir():
        raise Waiting(
            "ContainerCreating",
            f'MountVolume.SetUp failed for volume "{volume["name"]}" : '
            f"hostPath type check failed: {path} is not a directory",
        )
    elif kind == "File" and not (path.exists() and stat.S_ISREG(os.stat(path).st_mode)):
        raise Waiting(
            "ContainerCreating",
            f'MountVolume.SetUp failed for volume "{volume["name"]}" : '
            f"hostPath type check failed: {path} is not a file",
        )
    return str(path / sub) if sub else str(path)


def container_options(pod: Obj, inputs: PodInputs, labels: dict[str, str], name: str) -> dict[str, Any]:
    """The keyword arguments of docker's `containers.create` for the pod's (single) container."""
    container = pod["spec"]["containers"][0]
    user = effective_user(pod, container, inputs.image_user)
    check_non_root(pod, container, user)
    mount_list, tmpfs = mounts(pod, container, inputs)
    options: dict[str, Any] = {
        "image": inputs.image_id,
        "name": name,
        "hostname": pod["metadata"]["name"][:63],
        "labels": labels,
        "environment": environment(pod, container, inputs),
        "mounts": mount_list,
        "tmpfs": tmpfs,
        "detach": True,
        **security_options(pod, container),
        **resource_limits(container),
    }
    if container.get("command"):
        options["entrypoint"] = list(container["command"])
    if container.get("args"):
        options["command"] = list(container["args"])
    if user:
        options["user"] = user
    if container.get("workingDir"):
        options["working_dir"] = container["workingDir"]
    if inputs.network is None:
        options["network_mode"] = "none"
    else:
        options["network"] = inputs.network
        if inputs.hosts:
            options["extra_hosts"] = dict(inputs.hosts)
    return options
