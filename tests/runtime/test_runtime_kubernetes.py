"""The Kubernetes runtime: the shared contract, plus what only a cluster shows (the objects of a run, and the
ends Kubernetes reports: deadline, image pull, eviction, unschedulable).

Against tests/k8s/fake_apiserver.FakeKubernetes (every body validated against the 1.32 schemas, pods run in
Docker), or a real cluster when VFED_TEST_KUBECONFIG names its kubeconfig: then VFED_TEST_K8S_IMAGE names an
image the cluster can pull (python3, and the `vfed.inputs` label vfed/base carries: vfed/base pushed to the
cluster's registry), VFED_TEST_K8S_RUNTIME a YAML file of runtime settings for reaching that registry
(default_registry, registries, registry_credentials_file) and VFED_TEST_K8S_NAMESPACE the namespace; the
tests that inject faults or push to the loopback registry skip. Not run here (no cluster can run on these
machines): docs/vnode.md "Testing against a real cluster".

With the fake, the contract runs with `image_source: engine` (vfed/base is in the local engine, not in a
registry); the registry path runs end to end in test_a_moved_tag_does_not_move_a_started_run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from kubernetes import client, config
from pydantic import SecretStr
from runtime_contract import RuntimeContract, SpecFactory, make_spec, node_name, py
from tests.docker_registry import Registry, tiny_image
from tests.imagebuild import LABEL as BUILD_LABEL

from vfed.node.runtime import (
    DatasetMount,
    ExitStatus,
    NotFound,
    PermanentStartError,
    RunLimits,
    RunSpec,
    Runtime,
    RuntimeUnavailable,
)
from vfed.node.runtime import kubernetes as kubernetes_runtime
from vfed.node.runtime.kubernetes import KubernetesRuntime, parse_handle
from vfed.node.runtime.kubernetes_config import DatasetSource, KubernetesRuntimeConfig, RunClaim
from vfed.node.runtime.kubernetes_spec import job_body, network_policy_body, object_name, secret_body
from vfed.node.runtime.kubernetes_status import Observed, observe

sys.path.insert(0, str(Path(__file__).parents[1] / "k8s"))
from fake_apiserver import ENV_KUBECONFIG, FakeKubernetes

pytestmark = [pytest.mark.k8s, pytest.mark.docker]
__all__ = ["make_spec", "node_name"]  # shared fixtures, used by name

IMAGE = os.environ.get("VFED_TEST_K8S_IMAGE", "vfed/base")
"""Built by the test session (tests/imagebuild, which labels it with BUILD_LABEL)."""
NAMESPACE = os.environ.get("VFED_TEST_K8S_NAMESPACE", "default")
REAL_RUNTIME_SETTINGS = "VFED_TEST_K8S_RUNTIME"


class Cluster:
    """The cluster under test: its kubeconfig, the fake (None on a real cluster), the official client."""

    def __init__(self, kubeconfig: Path, fake: FakeKubernetes | None) -> None:
        self.kubeconfig = kubeconfig
        self.fake = fake
        api = config.new_client_from_config(str(kubeconfig))
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.net = client.NetworkingV1Api(api)

    def config(self, **changes: Any) -> KubernetesRuntimeConfig:
        if self.fake is None:
            extra_file = os.environ.get(REAL_RUNTIME_SETTINGS)
            extra = yaml.safe_load(Path(extra_file).read_text()) if extra_file else {}
        else:
            extra = {"image_source": "engine"}
        base = KubernetesRuntimeConfig(
            **extra,
            namespace=NAMESPACE,
            kubeconfig=str(self.kubeconfig),
            memory_bytes=256 << 20,
            nano_cpus=500_000_000,
            tmpfs_bytes=8 << 20,
            termination_grace_s=1,
            poll_interval_s=0.2,
            job_storage_bytes=16 << 20,
        )
        return base.model_copy(update=changes)

    def need_fake(self) -> FakeKubernetes:
        if self.fake is None:
            pytest.skip("injects a fault: needs the fake API server")
        return self.fake


_CLUSTER: Cluster | None = None


@pytest.fixture(scope="module")
def cluster(
    docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The fake with its digest policy (a pod must name its image `name@sha256:...`), or a real cluster."""
    global _CLUSTER  # noqa: PLW0603 - the contract's make_runtime takes no fixtures
    real = os.environ.get(ENV_KUBECONFIG)
    if real:
        _CLUSTER = Cluster(Path(real), None)
        yield _CLUSTER
        _CLUSTER = None
        return
    with FakeKubernetes(require_digest=True) as fake:
        _CLUSTER = Cluster(fake.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config"), fake)
        try:
            yield _CLUSTER
        finally:
            _CLUSTER = None


def _cluster() -> Cluster:
    assert _CLUSTER is not None, "the `cluster` fixture is not active"
    return _CLUSTER


@pytest.fixture(autouse=True)
def _in_cluster(cluster: Cluster) -> None:
    """Every test here runs with the module's cluster up."""


class TestKubernetesRuntime(RuntimeContract):
    __test__ = True
    image = IMAGE
    image_label = BUILD_LABEL

    def make_runtime(self) -> Runtime:
        return KubernetesRuntime(_cluster().config())

    def absent_handle(self) -> str:
        return f"k8s:{NAMESPACE}/vfed-nosuchnode-run-nosuchrun"


@pytest.fixture
def run_image() -> str:
    return IMAGE


@pytest.fixture
async def runtime(cluster: Cluster) -> AsyncIterator[KubernetesRuntime]:
    async with KubernetesRuntime(cluster.config()) as rt:
        yield rt


@pytest.fixture
def proxy_socket(tmp_path: Path) -> Iterator[Path]:
    """A real listening Unix socket (nothing answers on it; the tests look at the mount)."""
    path = tmp_path / "proxy" / "proxy.sock"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen()
        yield path


async def _running_pod(cluster: Cluster, job: str, timeout_s: float = 60) -> client.V1Pod:
    async with asyncio.timeout(timeout_s):
        while True:
            pods = await asyncio.to_thread(
                cluster.core.list_namespaced_pod, NAMESPACE, label_selector=f"job-name={job}"
            )
            running = [p for p in pods.items if p.status.phase == "Running"]
            if running:
                return running[0]
            await asyncio.sleep(0.2)


# --- the objects of a run --------------------------------------------------------------------------------


async def test_a_run_is_a_hardened_job_with_its_own_secret_and_policy(
    cluster: Cluster, make_spec: SpecFactory, tmp_path: Path, proxy_socket: Path
) -> None:
    data = tmp_path / "data.csv"
    data.write_text("x\n1\n")
    settings = cluster.config(proxy_service="vfed-proxy", proxy_port=8443, active_deadline_s=600)
    code = (
        "import os; print(open(os.environ['PROXY_TOKEN_FILE']).read(), os.environ['PROXY_URL'], flush=True); "
        "import time; time.sleep(60)"
    )
    spec = make_spec(
        py(code),
        proxy_socket=str(proxy_socket),
        proxy_token=SecretStr("run-token-1"),
        datasets=[DatasetMount(label="d1", host_path=str(data), type="csv")],
        limits=RunLimits(memory_bytes=128 << 20),
    )
    async with KubernetesRuntime(settings) as rt:
        handle = await rt.start(spec)
        _, name = parse_handle(handle)
        job = cluster.batch.read_namespaced_job(name, NAMESPACE)
        assert (
            job.spec.backoff_limit,
            job.spec.active_deadline_seconds,
            job.spec.ttl_seconds_after_finished,
        ) == (
            0,
            600,
            3600,
        )
        assert job.metadata.labels["vfed.run_id"] == spec.run_id
        assert job.metadata.labels["vfed.node"] == spec.node_name
        assert job.metadata.labels["vfed.job_id"] == "job1"
        pod_spec = job.spec.template.spec
        assert pod_spec.automount_service_account_token is False and pod_spec.restart_policy == "Never"
        assert pod_spec.security_context.run_as_non_root is True
        assert pod_spec.security_context.seccomp_profile.type == "RuntimeDefault"
        [container] = pod_spec.containers
        assert container.image.endswith(f"@{await rt.image_digest(IMAGE)}")  # by digest, always
        sc = container.security_context
        assert (sc.run_as_non_root, sc.read_only_root_filesystem, sc.allow_privilege_escalation) == (
            True,
            True,
            False,
        )
        assert sc.capabilities.drop == ["ALL"] and not sc.capabilities.add
        assert sc.seccomp_profile.type == "RuntimeDefault"
        assert container.resources.limits == {"memory": str(128 << 20), "cpu": "500m"}
        assert container.resources.requests == container.resources.limits
        mounts = {m.mount_path: m.read_only for m in container.volume_mounts}
        assert mounts == {
            "/mnt/run": None,
            "/mnt/job/tmp": None,
            "/tmp": None,
            "/run/vfed": True,
            "/run/vfed-token": True,
            "/mnt/data/d1": True,
        }

        secret = cluster.core.read_namespaced_secret(name, NAMESPACE)
        assert secret.data == {"token": "cnVuLXRva2VuLTE="}  # base64 of run-token-1
        volumes = {v.name: v for v in pod_spec.volumes}
        assert volumes["proxy-token"].secret.secret_name == name  # mounted into this run's pod only
        assert "run-token-1" not in str(job.to_dict())  # never in the Job itself
        token = await rt.proxy_token(handle)  # what an agent that restarted serves the run's proxy under
        assert token is not None and token.get_secret_value() == "run-token-1"

        policy = cluster.net.read_namespaced_network_policy(name, NAMESPACE).spec
        assert policy.pod_selector.match_labels == {"vfed.node": spec.node_name, "vfed.run_id": spec.run_id}
        assert policy.policy_types == ["Ingress", "Egress"] and not policy.ingress
        to_proxy, dns = policy.egress
        assert to_proxy.to[0].pod_selector.match_labels == {"app.kubernetes.io/name": "vfed-proxy"}
        assert [(p.port, p.protocol) for p in to_proxy.ports] == [(8443, "TCP")]
        assert dns.to[0].namespace_selector.match_labels == {"kubernetes.io/metadata.name": "kube-system"}
        assert {p.port for p in dns.ports} == {53}

        async with asyncio.timeout(60):
            while "run-token-1" not in await rt.logs(handle):  # noqa: ASYNC110 - polling a pod
                await asyncio.sleep(0.2)
        assert f"http://vfed-proxy.{NAMESPACE}.svc:8443" in await rt.logs(handle)

        await rt.kill(handle, grace_s=0)
        assert (await rt.wait(handle, timeout_s=5)).exit_code in (137, 143)
        for read in (cluster.batch.read_namespaced_job, cluster.core.read_namespaced_secret):
            with pytest.raises(client.exceptions.ApiException) as gone:
                read(name, NAMESPACE)
            assert gone.value.status == 404
        with pytest.raises(client.exceptions.ApiException):
            cluster.net.read_namespaced_network_policy(name, NAMESPACE)
        assert await rt.proxy_token(handle) is None  # gone with the run
        await rt.cleanup(handle)


def _spec(**kw: Any) -> RunSpec:
    fields: dict[str, Any] = {
        "run_id": "r1",
        "job_id": "j1",
        "node_name": "n1",
        "organization_id": "1",
        "image": "x@sha256:" + "a" * 64,
        "run_dir": "/srv/run",
    }
    return RunSpec(**{**fields, **kw})


def test_bodies_without_a_proxy_and_with_a_gpu() -> None:
    """No token: no Secret, no PROXY_URL, and a policy that lets nothing out; GPUs by their resource name."""
    settings = KubernetesRuntimeConfig(gpus=2, gpu_resource="example.com/gpu")
    assert secret_body(_spec()) is None
    assert network_policy_body(_spec(), settings)["spec"]["egress"] == []
    no_service = network_policy_body(_spec(proxy_token=SecretStr("t")), settings)
    assert no_service["spec"]["egress"] == []  # a token but no proxy Service configured: still nothing
    container = job_body(_spec(), "x@sha256:" + "a" * 64, settings)["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert container["resources"]["limits"]["example.com/gpu"] == "2"
    assert {e["name"] for e in container["env"]} == {"HOME"}
    assert object_name("vfed-n_1-run-a.b") == object_name("vfed-n_1-run-a.b")  # stable
    long = object_name("vfed-" + "x" * 80)
    assert len(long) <= 63 and long != object_name("vfed-" + "x" * 81)
    assert object_name("vfed-ok-run-1") == "vfed-ok-run-1"


# --- how runs end ----------------------------------------------------------------------------------------


async def test_deadline_exceeded_ends_the_run(cluster: Cluster, make_spec: SpecFactory) -> None:
    async with KubernetesRuntime(cluster.config(active_deadline_s=1)) as rt:
        handle = await rt.start(make_spec(py("import time; time.sleep(60)")))
        status = await rt.wait(handle, timeout_s=60)
        assert (status.exit_code, status.reason, status.succeeded) == (None, "deadline exceeded (1 s)", False)
        await rt.cleanup(handle)


async def test_image_pull_failure_ends_the_run(
    cluster: Cluster, make_spec: SpecFactory, tmp_path: Path
) -> None:
    fake = cluster.need_fake()
    spec = make_spec(py("pass"))
    async with KubernetesRuntime(cluster.config(), tmp_path / "kept") as rt:
        fake.inject_pull_failure(object_name(f"vfed-{spec.node_name}-run-{spec.run_id}"))
        handle = await rt.start(spec)
        status = await rt.wait(handle, timeout_s=60)
        assert status.exit_code is None and not status.succeeded
        assert status.reason is not None and status.reason.startswith("image pull failed (ErrImagePull)")
        assert "vfed: the run ended: image pull failed" in await rt.logs(handle)
        assert await rt.list_runs(spec.node_name) == []  # the runtime ended it: the Job is gone
        assert (await rt.wait(handle)).reason == status.reason
    async with KubernetesRuntime(cluster.config(), tmp_path / "kept") as restarted:
        assert await restarted.wait(handle) == status
        assert "vfed: the run ended: image pull failed" in await restarted.logs(handle)
        await restarted.cleanup(handle)


async def test_eviction_ends_the_run(cluster: Cluster, make_spec: SpecFactory) -> None:
    fake = cluster.need_fake()
    async with KubernetesRuntime(cluster.config()) as rt:
        handle = await rt.start(make_spec(py("import time; print('up', flush=True); time.sleep(60)")))
        pod = await _running_pod(cluster, parse_handle(handle)[1])
        fake.evict(NAMESPACE, pod.metadata.name)
        status = await rt.wait(handle, timeout_s=60)
        assert status.reason is not None and status.reason.startswith("evicted: The node was low on resource")
        assert not status.succeeded
        await rt.cleanup(handle)


async def test_unschedulable_ends_the_run_after_the_wait(cluster: Cluster, make_spec: SpecFactory) -> None:
    fake = cluster.need_fake()
    spec = make_spec(py("pass"))
    async with KubernetesRuntime(cluster.config(unschedulable_wait_s=1.5)) as rt:
        fake.inject_unschedulable(object_name(f"vfed-{spec.node_name}-run-{spec.run_id}"))
        handle = await rt.start(spec)
        early = await rt.wait(handle, timeout_s=0.5)
        assert early.timed_out  # pending, within the wait: still a run
        status = await rt.wait(handle, timeout_s=60)
        assert status.reason is not None and status.reason.startswith("unschedulable for ")
        assert "0/1 nodes are available" in status.reason


async def test_a_new_runtime_reattaches_and_kills_by_label(
    cluster: Cluster, runtime: KubernetesRuntime, make_spec: SpecFactory, node_name: str, tmp_path: Path
) -> None:
    """A run another runtime started is found by label and killed; what the kill kept (exit code, log)
    is reported again by a runtime made after an agent restart, from the agent's data folder."""
    spec = make_spec(py("import time; print('ready', flush=True); time.sleep(60)"))
    handle = await runtime.start(spec)
    await _running_pod(cluster, parse_handle(handle)[1])
    kept = tmp_path / "agent-data" / "kubernetes-ended"
    async with KubernetesRuntime(cluster.config(), kept) as fresh:
        [found] = await fresh.list_runs(node_name)
        assert (found.handle, found.run_id, found.job_id) == (handle, spec.run_id, "job1")
        assert (await fresh.wait(found.handle, timeout_s=0.3)).timed_out
        await fresh.kill(found.handle, grace_s=0)
        killed = await fresh.wait(found.handle, timeout_s=5)
        assert killed.exit_code in (137, 143)
        assert "ready" in await fresh.logs(found.handle)
    assert await runtime.list_runs(node_name) == []
    async with KubernetesRuntime(cluster.config(), kept) as restarted:  # the agent restarted: same outcome
        assert await restarted.wait(handle, timeout_s=5) == killed
        assert "ready" in await restarted.logs(handle)
        await restarted.cleanup(handle)
    assert list(kept.iterdir()) == []
    async with KubernetesRuntime(cluster.config(), kept) as after_cleanup:
        with pytest.raises(NotFound):
            await after_cleanup.wait(handle, timeout_s=1)


async def test_an_image_id_runs_under_its_name(
    cluster: Cluster, runtime: KubernetesRuntime, make_spec: SpecFactory
) -> None:
    """The agent starts runs by the image ID its policy checked; the pod names it `name@<that ID>`."""
    image_id = await runtime.image_digest(IMAGE)
    handle = await runtime.start(make_spec(py("pass"), image=image_id))
    assert (await runtime.wait(handle, timeout_s=60)).exit_code == 0
    job = cluster.batch.read_namespaced_job(parse_handle(handle)[1], NAMESPACE)
    name, digest = job.spec.template.spec.containers[0].image.split("@")
    assert digest == image_id and name.endswith(IMAGE.split(":")[0])
    with pytest.raises(PermanentStartError, match=r"is not present|was not looked up by name"):
        await runtime.start(make_spec(py("pass"), image="sha256:" + "f" * 64))


async def test_a_dataset_from_a_claim_is_read_only(
    cluster: Cluster, make_spec: SpecFactory, tmp_path: Path
) -> None:
    fake = cluster.need_fake()
    claim = f"data-{os.urandom(4).hex()}"
    body = {
        "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
    }
    cluster.core.create_namespaced_persistent_volume_claim(NAMESPACE, body)
    try:
        assert fake.kubelet is not None
        stored = Path(fake.kubelet.claim_paths[(NAMESPACE, claim)]) / "cohort.csv"
        stored.write_text("age\n41\n")
        stored.chmod(0o666)  # only the read-only mount may stop the write
        sources = {"cohort": DatasetSource(claim=claim, sub_path="cohort.csv")}
        code = (
            "import os; uri=os.environ['DATASET_COHORT_URI']; print(repr(open(uri).read()))\n"
            "try:\n open(uri, 'a').write('x')\nexcept OSError as e: print('refused', e)"
        )
        # the node's own path of the dataset is not used (and need not exist here): the claim is
        dataset = DatasetMount(label="cohort", host_path=str(tmp_path / "elsewhere.csv"), type="csv")
        async with KubernetesRuntime(cluster.config(dataset_sources=sources)) as rt:
            handle = await rt.start(make_spec(py(code), datasets=[dataset]))
            assert (await rt.wait(handle, timeout_s=60)).exit_code == 0, await rt.logs(handle)
            logs = await rt.logs(handle)
            assert "'age\\n41\\n'" in logs and "refused" in logs and "Read-only file system" in logs
            await rt.cleanup(handle)
        assert stored.read_text() == "age\n41\n"
    finally:
        cluster.core.delete_namespaced_persistent_volume_claim(claim, NAMESPACE)


async def test_a_runs_secret_and_policy_do_not_outlive_its_job(
    cluster: Cluster, make_spec: SpecFactory, node_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster deletes a finished Job after its ttl; the next listing removes what the run left."""
    settings = cluster.config(proxy_service="vfed-proxy")
    async with KubernetesRuntime(settings) as rt:
        handle = await rt.start(make_spec(py("pass"), proxy_token=SecretStr("t-1")))
        assert (await rt.wait(handle, timeout_s=60)).exit_code == 0
        name = parse_handle(handle)[1]
        cluster.batch.delete_namespaced_job(name, NAMESPACE, propagation_policy="Background")
        assert await rt.list_runs(node_name) == []
        cluster.core.read_namespaced_secret(name, NAMESPACE)  # young: a start may be under way, kept
        monkeypatch.setattr(kubernetes_runtime, "SWEEP_AGE_S", -1.0)
        assert await rt.list_runs(node_name) == []
        for read in (cluster.core.read_namespaced_secret, cluster.net.read_namespaced_network_policy):
            with pytest.raises(client.exceptions.ApiException) as gone:
                read(name, NAMESPACE)
            assert gone.value.status == 404


async def test_a_bad_configuration_is_unavailable_with_its_reason(cluster: Cluster, tmp_path: Path) -> None:
    for settings, reason in [
        (cluster.config(kubeconfig=str(tmp_path / "absent")), "kubernetes configuration"),
        (cluster.config(namespace="no-such-namespace"), "namespace no-such-namespace does not exist"),
    ]:
        runtime = KubernetesRuntime(settings)
        with pytest.raises(RuntimeUnavailable, match=reason):
            await runtime.open()
        await runtime.close()


def test_states_the_pods_leave_unsaid() -> None:
    """Ends told only by the Job, or by a pod without a container state; a pending pod within its wait."""
    complete = {"status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert observe(complete, []).status == ExitStatus(exit_code=0)
    evicted = {
        "metadata": {"name": "p"},
        "status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"},
    }
    assert observe({}, [evicted]).status == ExitStatus(exit_code=None, reason="evicted: low on memory")
    since = "2030-01-01T00:00:00Z"
    pending = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes",
                    "lastTransitionTime": since,
                }
            ],
        },
    }
    at = datetime(2030, 1, 1, 0, 0, 59, tzinfo=UTC)
    assert observe({}, [pending], now=at, unschedulable_wait_s=60) == Observed(None)
    later = observe({}, [pending], now=at + timedelta(seconds=1), unschedulable_wait_s=60)
    assert later.end and later.status == ExitStatus(
        exit_code=None, reason="unschedulable for 60 s: 0/3 nodes"
    )
    assert observe({}, []) == Observed(None)  # a Job whose pod is not made yet: running
    killed = {"metadata": {"name": "p"}, "spec": {"containers": [{}]}, "status": {"phase": "Failed"}}
    killed["status"]["containerStatuses"] = [{"state": {"terminated": {"exitCode": 137}}}]
    target = {"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded"}
    deciding = {"spec": {"activeDeadlineSeconds": 5}, "status": {"conditions": [target]}}
    assert observe(deciding, [killed]).status == ExitStatus(exit_code=None, reason="deadline exceeded (5 s)")
    assert observe({}, [killed]).status == ExitStatus(exit_code=137, reason="killed (SIGKILL)")


async def test_a_job_claim_being_deleted_is_not_used(
    cluster: Cluster, make_spec: SpecFactory, node_name: str
) -> None:
    """Deleted while a pod still uses it (the claim protection keeps it): a new run waits, it is not stuck."""
    async with KubernetesRuntime(cluster.config()) as first:
        handle = await first.start(make_spec(py("import time; time.sleep(60)"), job_id="going"))
        await _running_pod(cluster, parse_handle(handle)[1])
        claim = f"vfed-{node_name}-going-tmp"
        cluster.core.delete_namespaced_persistent_volume_claim(claim, NAMESPACE)
        async with KubernetesRuntime(cluster.config()) as fresh:
            with pytest.raises(RuntimeUnavailable, match="is being deleted"):
                await fresh.start(make_spec(py("pass"), job_id="going"))
        await first.cleanup(handle)


async def test_a_handle_of_another_namespace_names_no_run(runtime: KubernetesRuntime) -> None:
    other = "k8s:elsewhere/vfed-n-run-1"
    with pytest.raises(NotFound, match=f"not {NAMESPACE}"):
        await runtime.wait(other, timeout_s=1)
    with pytest.raises(NotFound):
        await runtime.logs(other)
    await runtime.kill(other)
    await runtime.cleanup(other)


async def test_run_folders_reach_pods_through_a_claim(cluster: Cluster, make_spec: SpecFactory) -> None:
    """With run_claim, input and output travel in a claim the agent has mounted, not on a node's disk."""
    fake = cluster.need_fake()
    claim = f"runs-{os.urandom(4).hex()}"
    body = {
        "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Mi"}}},
    }
    cluster.core.create_namespaced_persistent_volume_claim(NAMESPACE, body)
    try:
        assert fake.kubelet is not None
        agent_view = Path(fake.kubelet.claim_paths[(NAMESPACE, claim)])  # where the agent mounted it
        code = (
            "import os; d=open(os.environ['INPUT_FILE']).read(); "
            "open(os.environ['OUTPUT_FILE'],'w').write(d[::-1])"
        )
        outside = make_spec(py(code), input_text="in the claim")
        run_dir = agent_view / "runs" / outside.run_id
        run_dir.mkdir(parents=True)
        (run_dir / "input").write_text("in the claim")
        settings = cluster.config(run_claim=RunClaim(claim=claim, agent_path=str(agent_view)))
        async with KubernetesRuntime(settings) as rt:
            with pytest.raises(PermanentStartError, match=r"is not under run_claim\.agent_path"):
                await rt.start(outside)
            handle = await rt.start(outside.model_copy(update={"run_dir": str(run_dir)}))
            assert (await rt.wait(handle, timeout_s=60)).exit_code == 0, await rt.logs(handle)
            job = cluster.batch.read_namespaced_job(parse_handle(handle)[1], NAMESPACE).spec.template.spec
            [mount] = [m for m in job.containers[0].volume_mounts if m.mount_path == "/mnt/run"]
            assert mount.sub_path == f"runs/{outside.run_id}"
            assert {v.name: v.persistent_volume_claim for v in job.volumes}["run"].claim_name == claim
            assert (run_dir / "output").read_text() == "mialc eht ni"
            await rt.cleanup(handle)
    finally:
        cluster.core.delete_namespaced_persistent_volume_claim(claim, NAMESPACE)


# --- wait watches; images from a registry ----------------------------------------------------------------


async def test_wait_watches_the_run_and_resumes_after_gone(
    cluster: Cluster, make_spec: SpecFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """With a fallback read only every hour, only the watch can tell `wait` that the run ended; the fake
    keeps a history of one event, so each watch falls behind it at the next change and gets 410 Gone, and
    the runtime reads and watches again."""
    fake = cluster.need_fake()
    caplog.set_level(logging.DEBUG, logger="vfed.node.runtime.kubernetes")
    async with KubernetesRuntime(cluster.config(poll_interval_s=3600)) as rt:
        handle = await rt.start(make_spec(py("import time; time.sleep(1); raise SystemExit(3)")))
        await asyncio.to_thread(fake.set_history_window, 1)
        try:
            status = await rt.wait(handle, timeout_s=120)
        finally:
            await asyncio.to_thread(fake.set_history_window, 20_000)
        assert (status.exit_code, status.timed_out) == (3, False)
        assert any("refused (410)" in r.getMessage() for r in caplog.records)
        await rt.cleanup(handle)


@pytest.fixture
def registry_image(cluster: Cluster, oci_registry: Registry) -> Registry:
    cluster.need_fake()  # a real cluster cannot pull from this machine's loopback registry
    return oci_registry


async def test_a_moved_tag_does_not_move_a_started_run(
    cluster: Cluster, registry_image: Registry, make_spec: SpecFactory
) -> None:
    """Digests come from the registry; a pod names the one the policy allowed, so a tag pushed again after
    the check runs the old image still, pulled by digest."""
    first = tiny_image(registry_image, "oci-test/moving", "latest", {"v": "1"}, "one")
    settings = cluster.config(image_source="registry", default_registry=registry_image.host)
    async with KubernetesRuntime(settings) as rt:
        allowed = await rt.image_digest("oci-test/moving")
        assert allowed == first and (await rt.image_labels(allowed))["v"] == "1"
        second = tiny_image(registry_image, "oci-test/moving", "latest", {"v": "2"}, "two")
        assert await rt.image_digest("oci-test/moving") == second != first
        assert (await rt.image_labels(second))["v"] == "2"
        command = ["/bin/sh", "-c", "read v < /version; echo version $v"]
        handle = await rt.start(make_spec(command, image=allowed))
        job = cluster.batch.read_namespaced_job(parse_handle(handle)[1], NAMESPACE)
        assert job.spec.template.spec.containers[0].image == f"{registry_image.host}/oci-test/moving@{first}"
        assert (await rt.wait(handle, timeout_s=60)).exit_code == 0, await rt.logs(handle)
        assert "version one" in await rt.logs(handle)
        await rt.cleanup(handle)
