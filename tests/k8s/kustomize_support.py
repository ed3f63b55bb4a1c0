"""What tests/k8s/test_kustomize.py reads the Kustomize trees of docker/kubernetes with: `kubectl kustomize`
output as objects, label selectors as the API server matches them, and the Kubernetes API calls the node's
runtime makes, read from its source (so the Role is checked against the code, not against a copy of it)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tests import infra

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = ROOT / "docker" / "kubernetes"
RUNTIME_DIR = ROOT / "node" / "vfed" / "node" / "runtime"
Obj = dict[str, Any]

# The client's method suffix -> (API group, resource) for every kind the runtime may touch; a call on a kind
# missing here fails the test reading the calls: a new kind in the runtime is a decision, not a surprise.
RESOURCES = {
    "namespace": ("", "namespaces"),
    "job": ("batch", "jobs"),
    "pod": ("", "pods"),
    "pod_log": ("", "pods/log"),
    "persistent_volume_claim": ("", "persistentvolumeclaims"),
    "secret": ("", "secrets"),
    "network_policy": ("networking.k8s.io", "networkpolicies"),
}
VERBS = {"create": "create", "read": "get", "list": "list", "delete": "delete", "patch": "patch"}
VERBS["replace"] = "update"
_CALL = re.compile(r"^(create|read|list|delete|patch|replace)_(namespaced_(\w+)|namespace)$")


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        infra.missing("kubectl", "no kubectl on PATH (kubectl 1.32 carries Kustomize 5.5)")
        raise AssertionError("unreachable")
    return found


def render(tree: str) -> list[Obj]:
    """`kubectl kustomize docker/kubernetes/<tree>`, one object per document."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(KUSTOMIZE_DIR / tree)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"kubectl kustomize {tree} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@dataclass(frozen=True)
class Rendered:
    tree: str
    objects: list[Obj]

    def all(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Obj:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.tree}: {len(found)} {kind} objects named {name or '(any)'}"
        return found[0]

    def generated(self, kind: str, name: str) -> Obj:
        """A generated ConfigMap or Secret: its name carries Kustomize's content hash."""
        found = [o for o in self.all(kind) if re.fullmatch(rf"{name}-[a-z0-9]{{10}}", o["metadata"]["name"])]
        assert len(found) == 1, f"{self.tree}: {len(found)} generated {kind} {name}"
        return found[0]

    def namespace(self, obj: Obj) -> str:
        return str(obj["metadata"].get("namespace", "default"))


def pod_spec(deployment: Obj) -> Obj:
    spec: Obj = deployment["spec"]["template"]["spec"]
    return spec


def containers(deployment: Obj) -> Iterator[Obj]:
    spec = pod_spec(deployment)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(deployment: Obj, name: str) -> Obj:
    found = [c for c in pod_spec(deployment)["containers"] if c["name"] == name]
    assert len(found) == 1, f"no single container {name}"
    return found[0]


def volume(deployment: Obj, name: str) -> Obj:
    found = [v for v in pod_spec(deployment).get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"no single volume {name}"
    return found[0]


def mount_of(deployment: Obj, ctr: Obj, path: str) -> tuple[Obj, Obj, str]:
    """(mount, volume, path inside the volume) of the deepest mount of `ctr` holding `path`."""
    best: Obj | None = None
    for m in ctr.get("volumeMounts", []):
        root = m["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and (
            best is None or len(root) > len(best["mountPath"])
        ):
            best = m
    assert best is not None, f"{path} is on no volume of container {ctr['name']}"
    inside = path[len(best["mountPath"].rstrip("/")) :].lstrip("/")
    return best, volume(deployment, best["name"]), inside


def port_number(ctr: Obj, port: int | str) -> int:
    """A container port by number or by name (as probes, Services and NetworkPolicies name it)."""
    if isinstance(port, int):
        return port
    found = [p["containerPort"] for p in ctr.get("ports", []) if p.get("name") == port]
    assert len(found) == 1, f"container {ctr['name']} has no single port named {port}"
    return int(found[0])


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """A LabelSelector's verdict on these labels (matchLabels and matchExpressions, as the API server)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def runtime_calls() -> set[tuple[str, str, str]]:
    """(API group, resource, verb) of every Kubernetes API method the runtime's modules name, and `watch` for
    a list method handed to a watch stream."""
    calls: set[tuple[str, str, str]] = set()
    for source in sorted(RUNTIME_DIR.glob("kubernetes*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and (m := _CALL.match(node.attr)):
                suffix = m.group(3) or "namespace"
                assert suffix in RESOURCES, f"{source.name}: {node.attr} calls a kind this test does not map"
                calls.add((*RESOURCES[suffix], VERBS[m.group(1)]))
            calls |= _watched(node)
    return calls


def _watched(node: ast.AST) -> set[tuple[str, str, str]]:
    """`watch` on what a `<watcher>.stream(<api>.list_namespaced_<kind>, ...)` call follows."""
    if not (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "stream"
    ):
        return set()
    first = node.args[0] if node.args else None
    if isinstance(first, ast.Attribute) and (m := _CALL.match(first.attr)) and m.group(1) == "list":
        return {(*RESOURCES[m.group(3) or "namespace"], "watch")}
    return set()


def role_grants(role: Obj) -> set[tuple[str, str, str]]:
    grants = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"a wildcard in {rule}"
                    grants.add((group, resource, verb))
    return grants


def mosquitto_conf(text: str) -> list[tuple[str, list[str]]]:
    """Mosquitto's configuration as (option, arguments) lines, comments and blanks left out."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            option, *args = line.split()
            lines.append((option, args))
    return lines
