"""The Kustomize trees of docker/kubernetes, rendered with `kubectl kustomize` and validated against the 1.32
schemas (kubernetes-validate, strict: an unknown field fails), then read for what a schema cannot see: the
Role against the runtime's own API calls, the proxy Service against the runtime's configuration, secrets as
mounted files, every container hardened, probes on the ports the images serve, the broker beside the server.

The configuration each Deployment hands its program (the ConfigMap file plus the container's VFED_* variables)
is validated by the program's own settings models; the secret files it names are checked to lie on a mounted
Secret instead of being read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from kustomize_support import (
    Obj,
    Rendered,
    container,
    containers,
    mosquitto_conf,
    mount_of,
    pod_spec,
    port_number,
    render,
    role_grants,
    runtime_calls,
    selects,
    volume,
)
from pydantic import SecretStr
from sqlalchemy import make_url
from tests import infra

pytestmark = pytest.mark.k8s

KUBERNETES_VERSION = "1.32"
NODE_TREES = ("node/base", "node/overlays/example")
SERVER_TREES = ("server/base", "server/overlays/example")
OVERLAYS = ("node/overlays/example", "server/overlays/example")
_cache: dict[str, Rendered] = {}


def rendered(tree: str) -> Rendered:
    if tree not in _cache:
        _cache[tree] = Rendered(tree, render(tree))
    return _cache[tree]


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError as exc:
        infra.missing("kubernetes-validate", f"{exc} (the k8s extra: pip install -e '.[k8s]')")
        raise AssertionError("unreachable") from exc
    return kv


# --- the schemas --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", NODE_TREES + SERVER_TREES)
def test_every_document_passes_strict_validation_for_1_32(tree: str) -> None:
    kv = kubernetes_validate()
    objects = rendered(tree).objects
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "NetworkPolicy"} <= kinds
    for obj in objects:
        kv.validate(obj, KUBERNETES_VERSION, strict=True)  # raises ValidationError naming the field


def test_strict_validation_refuses_an_unknown_field() -> None:
    """The check above can fail: one unknown field in a rendered Deployment is refused."""
    kv = kubernetes_validate()
    deployment = rendered("node/base").one("Deployment", "vfed-node")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 1}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("tree", OVERLAYS)
def test_an_overlay_puts_everything_in_its_namespace_and_fills_every_reference(tree: str) -> None:
    r = rendered(tree)
    namespace = r.one("Namespace")["metadata"]["name"]
    for obj in r.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]["name"]
    names = {(o["kind"], o["metadata"]["name"]) for o in r.objects}
    for deployment in r.all("Deployment"):
        spec = pod_spec(deployment)
        assert ("ServiceAccount", spec["serviceAccountName"]) in names
        for vol in spec["volumes"]:
            if "secret" in vol:
                assert ("Secret", vol["secret"]["secretName"]) in names, vol
            if "configMap" in vol and not vol["configMap"].get("optional"):
                assert ("ConfigMap", vol["configMap"]["name"]) in names, vol
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in names, vol


# --- hardening ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tree", NODE_TREES + SERVER_TREES)
def test_every_container_is_hardened_limited_and_probed(tree: str) -> None:
    deployments = rendered(tree).all("Deployment")
    assert deployments
    for deployment in deployments:
        spec = pod_spec(deployment)
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] > 0
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
        for vol in spec["volumes"]:
            assert "hostPath" not in vol, f"{vol['name']}: no host path in a hardened pod"
        for ctr in containers(deployment):
            where = f"{deployment['metadata']['name']}/{ctr['name']}"
            sc = ctr["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(ctr["resources"][kind]), f"{where}: {kind}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                action = ctr[probe].get("httpGet") or ctr[probe].get("tcpSocket")
                assert action is not None, f"{where}: {probe}"
                port_number(ctr, action["port"])  # a port the container declares
            for mount in ctr.get("volumeMounts", []):
                if not mount.get("readOnly"):
                    vol = volume(deployment, mount["name"])
                    assert "emptyDir" in vol or "persistentVolumeClaim" in vol, f"{where}: {mount}"


@pytest.mark.parametrize("tree", NODE_TREES + SERVER_TREES)
def test_secrets_reach_containers_as_files_never_as_environment(tree: str) -> None:
    r = rendered(tree)
    for deployment in r.all("Deployment"):
        for ctr in containers(deployment):
            for env in ctr.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), f"{ctr['name']}: {env['name']}"
            assert all("secretRef" not in e for e in ctr.get("envFrom", [])), ctr["name"]
            for mount in ctr.get("volumeMounts", []):
                if "secret" in volume(deployment, mount["name"]):
                    assert mount.get("readOnly") is True, mount
        for vol in pod_spec(deployment)["volumes"]:
            if "secret" in vol:
                assert vol["secret"]["defaultMode"] & 0o007 == 0, f"{vol['name']}: readable by others"


# --- the node -----------------------------------------------------------------------------------------------


def _clear_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith(("VFED_NODE__", "VFED_SERVER__")):
            monkeypatch.delenv(key)


def _program_config(r: Rendered, deployment: Obj, ctr: Obj, configmap: str) -> str:
    """The text of the file `--config` names, found through the container's mount of the ConfigMap."""
    path = ctr["args"][ctr["args"].index("--config") + 1]
    _, vol, inside = mount_of(deployment, ctr, path)
    cm = r.generated("ConfigMap", configmap)
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    return str(cm["data"][inside])


def _environment(r: Rendered, deployment: Obj, ctr: Obj, monkeypatch: pytest.MonkeyPatch) -> None:
    """The container's variables in this process, as the kubelet would set them."""
    for env in ctr.get("env", []):
        if "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
        else:
            assert env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, env
            monkeypatch.setenv(env["name"], r.namespace(deployment))


def _record_secret_files(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """`<secret>_file` keys are recorded instead of read (the files are the Secret's, in the pod)."""
    from vfed.common import env_config

    asked: list[Path] = []

    def read(path: Path, what: str, *, min_length: int = 1) -> str:
        asked.append(Path(path))
        return "7.a-secret-of-more-than-sixteen-characters"

    monkeypatch.setattr(env_config, "read_secret_file", read)
    return asked


def _node(tree: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Rendered, Obj, Obj, Any, list[Path]]:
    from vfed.node.config import environment_layer, parse_settings

    r = rendered(tree)
    deployment = r.one("Deployment", "vfed-node")
    agent = container(deployment, "agent")
    text = _program_config(r, deployment, agent, "vfed-node-config")
    _clear_environment(monkeypatch)
    _environment(r, deployment, agent, monkeypatch)
    asked = _record_secret_files(monkeypatch)
    settings = parse_settings(yaml.safe_load(text), env=environment_layer())
    return r, deployment, agent, settings, asked


def _on_secret(r: Rendered, deployment: Obj, ctr: Obj, path: Path) -> None:
    """`path` is a file of a Secret mounted into `ctr` (and, where the tree has the Secret, one of its
    keys)."""
    _, vol, inside = mount_of(deployment, ctr, str(path))
    assert "secret" in vol, f"{path} is not on a Secret"
    secrets = [s for s in r.all("Secret") if s["metadata"]["name"] == vol["secret"]["secretName"]]
    for secret in secrets:
        assert inside in secret.get("data", {}), f"{path}: no key {inside} in {secret['metadata']['name']}"


def test_the_role_grants_exactly_the_runtime_calls() -> None:
    calls = runtime_calls()
    assert {r for _, r, _ in calls} >= {"jobs", "pods", "pods/log", "secrets", "networkpolicies"}
    for tree in NODE_TREES:
        r = rendered(tree)
        role = r.one("Role")
        assert role_grants(role) == calls, f"{tree}: the Role differs from the runtime's calls"
        binding = r.one("RoleBinding")
        account = r.one("ServiceAccount", pod_spec(r.one("Deployment", "vfed-node"))["serviceAccountName"])
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"]}
        if "namespace" in account["metadata"]:
            subject["namespace"] = account["metadata"]["namespace"]
        assert binding["subjects"] == [subject]
        assert r.namespace(role) == r.namespace(binding) == r.namespace(account)
        assert pod_spec(r.one("Deployment", "vfed-node"))["automountServiceAccountToken"] is True
        assert r.all("ClusterRole") == [] and r.all("ClusterRoleBinding") == []


@pytest.mark.parametrize("tree", NODE_TREES)
def test_the_node_config_is_valid_and_its_secrets_are_mounted(
    tree: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, deployment, agent, settings, asked = _node(tree, monkeypatch)
    assert settings.runtime.kind == "kubernetes"
    assert settings.runtime.kubeconfig is None  # the pod's service account
    assert settings.runtime.namespace == r.namespace(deployment)
    assert asked, "the API key comes from a file"
    for path in [*asked, settings.key_path, settings.metrics_token_file]:
        _on_secret(r, deployment, agent, path)
    _, data, inside = mount_of(deployment, agent, str(settings.data_dir))
    assert "persistentVolumeClaim" in data and inside, "data_dir: a folder of the agent's own on its claim"
    if settings.server_ca_file is not None:
        _, ca, key = mount_of(deployment, agent, str(settings.server_ca_file))
        maps = [m for m in r.all("ConfigMap") if m["metadata"]["name"] == ca["configMap"]["name"]]
        assert [key in m["data"] for m in maps] == [True], "server_ca_file: a key of a ConfigMap of the tree"
    assert settings.metrics_port == port_number(agent, "metrics")
    assert settings.metrics_host == "0.0.0.0"


def _run_spec(settings: Any, tmp_path: Path) -> Any:
    from vfed.node.runtime.base import DatasetMount, RunSpec

    run_dir = settings.data_dir / "runs" / "42"
    datasets = [
        DatasetMount(label=label, host_path=d.uri, type=d.type) for label, d in settings.datasets.items()
    ]
    return RunSpec(
        node_name=settings.name,
        run_id="42",
        job_id="7",
        organization_id="3",
        image="registry.example.org/vfed-examples/stats@sha256:" + "a" * 64,
        run_dir=str(run_dir),
        datasets=datasets,
        proxy_token=SecretStr("a-run-token"),
    )


@pytest.mark.parametrize("tree", NODE_TREES)
def test_runs_reach_the_proxy_service_and_nothing_else(
    tree: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The runtime's own bodies for a run, from this tree's configuration: valid for 1.32, their egress goes
    to the agent's pods on the port the proxy Service serves, and the agent's policy lets them in."""
    from vfed.node.runtime.kubernetes_spec import (
        claim_body,
        job_body,
        network_policy_body,
        run_labels,
        secret_body,
    )

    kv = kubernetes_validate()
    r, deployment, agent, settings, _ = _node(tree, monkeypatch)
    rc = settings.runtime
    agent_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = r.one("Service", rc.proxy_service)
    assert r.namespace(service) == rc.namespace
    assert selects({"matchLabels": service["spec"]["selector"]}, agent_labels)
    assert selects(deployment["spec"]["selector"], agent_labels)
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "proxy"]
    # PROXY_URL names the Service's port; the agent's listener serves the pod's port (the target), which the
    # run's NetworkPolicy allows, on every address of the pod
    assert port["port"] == rc.proxy_port and port_number(agent, port["targetPort"]) == rc.listen_port
    assert rc.proxy_listen_host == "0.0.0.0"

    spec = _run_spec(settings, tmp_path)
    policy = network_policy_body(spec, rc)
    bodies = [policy, job_body(spec, spec.image, rc), claim_body(spec.node_name, spec.job_id, rc)]
    bodies.append(secret_body(spec))
    for body in bodies:
        kv.validate(body, KUBERNETES_VERSION, strict=True)
    proxy_rule = policy["spec"]["egress"][0]
    assert proxy_rule["ports"] == [{"port": rc.listen_port, "protocol": "TCP"}]
    assert selects(proxy_rule["to"][0]["podSelector"], agent_labels)

    agent_policy = r.one("NetworkPolicy", "vfed-node-agent")
    assert selects(agent_policy["spec"]["podSelector"], agent_labels)
    run_pod = run_labels(spec)
    admitted = [
        rule
        for rule in agent_policy["spec"]["ingress"]
        if any(selects(peer.get("podSelector", {}), run_pod) for peer in rule.get("from", []))
        and any(port_number(agent, p["port"]) == rc.listen_port for p in rule["ports"])
    ]
    assert admitted, "the agent's NetworkPolicy keeps its runs from the proxy port"


@pytest.mark.parametrize("tree", NODE_TREES)
def test_run_folders_and_datasets_reach_pods_through_claims_the_agent_mounts(
    tree: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from vfed.node.runtime.kubernetes_spec import job_body

    r, deployment, agent, settings, _ = _node(tree, monkeypatch)
    rc = settings.runtime
    assert rc.run_claim is not None
    r.one("PersistentVolumeClaim", rc.run_claim.claim)
    _, vol, inside = mount_of(deployment, agent, rc.run_claim.agent_path)
    assert vol["persistentVolumeClaim"]["claimName"] == rc.run_claim.claim and inside == ""
    spec = _run_spec(settings, tmp_path)
    pod = job_body(spec, spec.image, rc)["spec"]["template"]["spec"]
    (run_volume,) = [v for v in pod["volumes"] if v["name"] == "run"]
    (run_mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "run"]
    assert run_volume["persistentVolumeClaim"]["claimName"] == rc.run_claim.claim
    _, _, agent_inside = mount_of(deployment, agent, spec.run_dir)
    assert run_mount["subPath"] == agent_inside, "the pod sees the run folder the agent writes"
    for label, dataset in settings.datasets.items():
        source = rc.dataset_sources.get(label)
        assert source is not None and source.claim is not None, f"{label}: from a claim, not a host path"
        r.one("PersistentVolumeClaim", source.claim)
        mount, vol, inside = mount_of(deployment, agent, dataset.uri)
        assert vol["persistentVolumeClaim"]["claimName"] == source.claim and mount["readOnly"] is True
        assert inside == source.sub_path, f"{label}: the agent and the pods read the same file"


# --- the server ---------------------------------------------------------------------------------------------


def _server(
    tree: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[Rendered, Obj, Any, list[Path]]:
    from vfed.server.config import load_settings

    r = rendered(tree)
    deployment = r.one("Deployment", "vfed-server")
    server = container(deployment, "server")
    config = tmp_path / "server.yaml"
    config.write_text(_program_config(r, deployment, server, "vfed-server-config"), encoding="utf-8")
    _clear_environment(monkeypatch)
    _environment(r, deployment, server, monkeypatch)
    asked = _record_secret_files(monkeypatch)
    data_dir = Path(server["args"][server["args"].index("--data-dir") + 1])
    return r, deployment, load_settings(config, data_dir=data_dir), asked


@pytest.mark.parametrize("tree", SERVER_TREES)
def test_the_server_config_is_valid_and_its_secrets_are_mounted(
    tree: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    r, deployment, settings, asked = _server(tree, monkeypatch, tmp_path)
    server = container(deployment, "server")
    assert settings.database_url is not None and settings.database_url.startswith("postgresql+asyncpg://")
    assert make_url(settings.database_url).password is None, "the password is database_password_file's"
    assert len(asked) == 3, "database password, JWT secret and broker password from files"
    for path in [*asked, settings.tls.key_file, settings.tls.cert_file, settings.metrics.token_file]:
        _on_secret(r, deployment, server, path)
    _, data, _ = mount_of(deployment, server, str(settings.data_dir))
    assert "persistentVolumeClaim" in data
    assert settings.port == port_number(server, "https")
    assert settings.metrics.port == port_number(server, "metrics")
    ready = server["readinessProbe"]["httpGet"]
    assert (ready["path"], ready["scheme"]) == ("/api/v1/health", "HTTPS")  # tls.cert_file is set
    assert port_number(server, ready["port"]) == settings.port


@pytest.mark.parametrize("tree", SERVER_TREES)
def test_the_broker_beside_the_server_shares_its_files_and_signals(
    tree: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    r, deployment, settings, _ = _server(tree, monkeypatch, tmp_path)
    spec = pod_spec(deployment)
    server, broker = container(deployment, "server"), container(deployment, "mosquitto")
    assert spec["shareProcessNamespace"] is True, "the server's SIGHUP must reach Mosquitto"
    assert "runAsUser" not in server["securityContext"] and "runAsUser" not in broker["securityContext"]
    conf_path = broker["command"][-1].rsplit(" -c ", 1)[1].strip()
    _, conf_volume, conf_key = mount_of(deployment, broker, conf_path)
    conf_map = r.generated("ConfigMap", "vfed-server-mosquitto")
    assert conf_volume["configMap"]["name"] == conf_map["metadata"]["name"]
    conf = mosquitto_conf(conf_map["data"][conf_key])

    def option(name: str) -> list[list[str]]:
        return [args for key, args in conf if key == name]

    assert option("allow_anonymous") == [["false"]] and option("persistence") == [["false"]]
    broker_dir = str(settings.mqtt.broker_dir)
    assert option("password_file") == [[f"{broker_dir}/passwd"]]
    assert option("acl_file") == [[f"{broker_dir}/acl"]]
    assert option("pid_file") == [[str(settings.mqtt.broker_pid_file)]]
    for ctr in (server, broker):
        mount, vol, inside = mount_of(deployment, ctr, broker_dir)
        assert "emptyDir" in vol and inside == "" and not mount.get("readOnly"), ctr["name"]
    listeners = {int(a[0]): a[1] for a in option("listener")}
    url = settings.mqtt.url
    assert url is not None and url.startswith("mqtt://127.0.0.1:")
    assert listeners[int(url.rsplit(":", 1)[1])] == "127.0.0.1", "plain MQTT on the pod's loopback only"
    tls_port = port_number(broker, "mqtts")
    assert listeners[tls_port] == "0.0.0.0"
    for key in ("certfile", "keyfile"):
        (path,) = option(key)
        _on_secret(r, deployment, broker, Path(path[0]))
    public = settings.mqtt.public_url
    service = r.one("Service", "vfed-server")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert public is not None and public.startswith("mqtts://")
    assert public.endswith(f":{ports['mqtts']['port']}"), "nodes are told the Service's broker port"
    assert port_number(broker, ports["mqtts"]["targetPort"]) == tls_port
    assert port_number(server, ports["https"]["targetPort"]) == settings.port
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    assert selects(r.one("NetworkPolicy", "vfed-server")["spec"]["podSelector"], labels)
