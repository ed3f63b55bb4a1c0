"""The fake Kubernetes API server, driven through the official `kubernetes` client: requests are refused or
accepted as the real server would, and Jobs really run (in Docker) with real outcomes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from fake_apiserver import FakeKubernetes
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

pytestmark = [pytest.mark.k8s, pytest.mark.docker]

IMAGE = "vfed/base:latest"  # a locally built image with python3 (the fake never pulls from a registry)
NS = "default"
HARDENED = {
    "runAsUser": 10001,
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


class Cluster:
    """The official client's APIs against one fake, plus helpers that wait on the real outcome."""

    def __init__(self, fake: FakeKubernetes, kubeconfig: Path) -> None:
        self.fake = fake
        self.api = config.new_client_from_config(str(kubeconfig))
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.net = client.NetworkingV1Api(self.api)

    def job(self, command: list[str], name: str | None = None, **spec: Any) -> str:
        """Create a Job running `command` (hardened, no retry unless asked); returns its name."""
        name = name or f"j-{uuid.uuid4().hex[:8]}"
        container: dict[str, Any] = {
            "name": "main",
            "image": spec.pop("image", IMAGE),
            "command": command,
            "securityContext": HARDENED,
        }
        container.update(spec.pop("container", {}))
        pod_spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [container]}
        pod_spec.update(spec.pop("pod", {}))
        body = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "labels": {"t": "fake"}},
            "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}, **spec},
        }
        self.batch.create_namespaced_job(NS, body)
        return name

    def wait_job(self, name: str, timeout_s: float = 60) -> client.V1Job:
        """The Job once it has a terminal condition (Complete or Failed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.batch.read_namespaced_job(name, NS)
            if any(c.type in ("Complete", "Failed") for c in job.status.conditions or []):
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {name} did not finish in {timeout_s}s")

    def pods(self, job: str) -> list[client.V1Pod]:
        return list(self.core.list_namespaced_pod(NS, label_selector=f"job-name={job}").items)

    def wait_pod(
        self, job: str, check: Callable[[client.V1Pod], bool], timeout_s: float = 30
    ) -> client.V1Pod:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for pod in self.pods(job):
                if check(pod):
                    return pod
            time.sleep(0.2)
        raise AssertionError(f"no pod of {job} reached the expected state: {self.pods(job)}")

    def containers(self) -> list[Any]:
        engine = docker.from_env()
        try:
            return list(engine.containers.list(all=True, filters={"label": self.fake.label}))
        finally:
            engine.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with FakeKubernetes() as fake:
        kubeconfig = fake.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config")
        yield Cluster(fake, kubeconfig)


def conditions(job: client.V1Job) -> dict[str, str]:
    return {c.type: c.reason for c in job.status.conditions or []}


def terminated(pod: client.V1Pod) -> client.V1ContainerStateTerminated | None:
    statuses = pod.status.container_statuses or []
    return statuses[0].state.terminated if statuses else None


def post_raw(
    cluster: Cluster, path: str, body: Any, query: list[tuple[str, str]] | None = None, method: str = "POST"
) -> Any:
    """POST a body the client's own (pydantic) models would refuse to send, through the client's transport and
    auth, as a client in another language (or an older one) could send it. Returns the deserialized answer
    (raises ApiException on an error status, as the typed calls do)."""
    request = cluster.api.param_serialize(
        method,
        path,
        path_params={"namespace": NS},
        query_params=query or [],
        body=body,
        auth_settings=["BearerToken"],
        header_params={"Content-Type": "application/json", "Accept": "application/json"},
    )
    response = cluster.api.call_api(*request)
    response.read()
    return cluster.api.response_deserialize(response, {"200": "object", "201": "object"})


JOBS_PATH = "/apis/batch/v1/namespaces/{namespace}/jobs"
SECRETS_PATH = "/api/v1/namespaces/{namespace}/secrets"
POLICIES_PATH = "/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"


def error_of(call: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
    with pytest.raises(ApiException) as caught:
        call()
    return caught.value.status, json.loads(caught.value.body)


# --- requests the real server refuses --------------------------------------------------------------------


def test_invalid_job_bodies_are_refused_like_the_real_server(cluster: Cluster) -> None:
    def body(**spec: Any) -> dict[str, Any]:
        container = {"name": "c", "image": IMAGE, **spec.pop("container", {})}
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "bad"},
            "spec": {
                "template": {
                    "spec": {"restartPolicy": spec.pop("restart", "Never"), "containers": [container]}
                },
                **spec,
            },
        }

    code, status = error_of(lambda: post_raw(cluster, JOBS_PATH, body(backoffLimit="six")))
    assert (code, status["kind"], status["reason"]) == (400, "Status", "BadRequest")
    assert "spec.backoffLimit" in status["message"]

    code, status = error_of(lambda: post_raw(cluster, JOBS_PATH, body(backofLimit=1)))
    assert (code, status["reason"]) == (400, "BadRequest")
    assert status["message"] == 'strict decoding error: unknown field "spec.backofLimit"'

    missing_name = body()
    del missing_name["spec"]["template"]["spec"]["containers"][0]["name"]
    code, status = error_of(lambda: post_raw(cluster, JOBS_PATH, missing_name))
    assert (code, status["reason"]) == (422, "Invalid")
    assert status["message"].startswith('Job.batch "bad" is invalid: spec.template.spec.containers[0]')
    assert "'name' is a required property" in status["details"]["causes"][0]["message"]

    code, status = error_of(lambda: cluster.batch.create_namespaced_job(NS, body(restart="Always")))
    assert (code, status["reason"]) == (422, "Invalid")
    assert 'spec.template.spec.restartPolicy: Unsupported value: "Always"' in status["message"]

    code, status = error_of(
        lambda: cluster.batch.create_namespaced_job(
            NS, body(container={"resources": {"limits": {"memory": "lots"}}})
        )
    )
    assert (code, status["reason"]) == (422, "Invalid")

    bad_name = body()
    bad_name["metadata"]["name"] = "Not_A_Name"
    assert error_of(lambda: cluster.batch.create_namespaced_job(NS, bad_name))[0] == 422
    assert cluster.batch.list_namespaced_job(NS, label_selector="t=none").items == []


def test_unknown_field_is_dropped_with_a_warning_when_asked(cluster: Cluster) -> None:
    body = {"metadata": {"name": f"s-{uuid.uuid4().hex[:6]}", "colour": "red"}, "stringData": {"k": "v"}}
    response = post_raw(cluster, SECRETS_PATH, body, [("fieldValidation", "Warn")])
    assert response.status_code == 201
    assert 'unknown field "metadata.colour"' in response.headers["Warning"]
    assert "colour" not in response.data["metadata"]
    code, status = error_of(lambda: post_raw(cluster, SECRETS_PATH, body, [("fieldValidation", "Strict")]))
    assert (code, status["message"]) == (400, 'strict decoding error: unknown field "metadata.colour"')


def test_errors_are_status_documents(cluster: Cluster, tmp_path: Path) -> None:
    code, status = error_of(lambda: cluster.batch.read_namespaced_job("nope", NS))
    assert (code, status["reason"], status["message"]) == (404, "NotFound", 'jobs.batch "nope" not found')
    code, status = error_of(lambda: cluster.core.read_namespaced_pod("nope", NS))
    assert (code, status["message"]) == (404, 'pods "nope" not found')
    secret = {"metadata": {"name": "twice"}, "stringData": {"a": "b"}}
    cluster.core.create_namespaced_secret(NS, secret)
    code, status = error_of(lambda: cluster.core.create_namespaced_secret(NS, secret))
    assert (code, status["reason"], status["message"]) == (
        409,
        "AlreadyExists",
        'secrets "twice" already exists',
    )
    code, status = error_of(lambda: cluster.core.create_namespaced_secret("elsewhere", secret))
    assert (code, status["message"]) == (404, 'namespaces "elsewhere" not found')
    assert error_of(lambda: cluster.core.list_namespaced_pod(NS, label_selector="a in (b"))[0] == 400
    pods = "/api/v1/namespaces/{namespace}/pods"
    bad_timeout = [("watch", "true"), ("timeoutSeconds", "soon")]
    assert error_of(lambda: post_raw(cluster, pods, None, bad_timeout, method="GET"))[0] == 400
    code, status = error_of(lambda: post_raw(cluster, JOBS_PATH, {}, [("fieldValidation", "Loose")]))
    assert code == 400 and "fieldValidation" in status["message"]

    kubeconfig = tmp_path / "wrong"
    cluster.fake.write_kubeconfig(kubeconfig)
    kubeconfig.write_text(kubeconfig.read_text().replace(cluster.fake.token, "wrong-token"))
    stranger = client.CoreV1Api(config.new_client_from_config(str(kubeconfig)))
    assert error_of(lambda: stranger.read_namespace(NS))[0] == 401


def test_secret_and_network_policy_validate_and_malformed_ones_do_not(cluster: Cluster) -> None:
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "only-proxy"},
        "spec": {
            "podSelector": {"matchLabels": {"vfed/run": "r1"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [
                {
                    "to": [{"podSelector": {"matchLabels": {"app": "proxy"}}}],
                    "ports": [{"port": 8080, "protocol": "TCP"}],
                }
            ],
        },
    }
    created = cluster.net.create_namespaced_network_policy(NS, policy)
    assert created.metadata.uid and created.spec.egress[0].ports[0].port == 8080
    assert [p.metadata.name for p in cluster.net.list_namespaced_network_policy(NS).items] == ["only-proxy"]

    broken = json.loads(json.dumps(policy))
    broken["metadata"]["name"] = "broken"
    broken["spec"]["egress"][0]["ports"] = [{"port": 8080, "protocol": "TCP", "portRange": 2}]
    assert error_of(lambda: post_raw(cluster, POLICIES_PATH, broken))[0] == 400
    del broken["spec"]["podSelector"]
    broken["spec"]["egress"][0]["ports"] = []
    code, status = error_of(lambda: post_raw(cluster, POLICIES_PATH, broken))
    assert (code, status["reason"]) == (422, "Invalid") and "podSelector" in status["message"]

    secret = cluster.core.create_namespaced_secret(
        NS, {"metadata": {"name": "run-secret"}, "stringData": {"token": "abc"}}
    )
    assert secret.data == {"token": "YWJj"} and secret.type == "Opaque"
    bad = {"metadata": {"name": "bad-secret"}, "data": {"token": "not base64!"}}
    assert error_of(lambda: post_raw(cluster, SECRETS_PATH, bad))[0] == 400
    bad = {"metadata": {"name": "bad-secret"}, "data": ["token"]}
    assert error_of(lambda: post_raw(cluster, SECRETS_PATH, bad))[0] == 400
    assert error_of(lambda: cluster.core.read_namespaced_secret("bad-secret", NS))[0] == 404


# --- Jobs really run ---------------------------------------------------------------------------------


def test_job_output_on_a_claim_is_read_by_a_second_job(cluster: Cluster) -> None:
    claim = {
        "metadata": {"name": "job-data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Mi"}}},
    }
    created = cluster.core.create_namespaced_persistent_volume_claim(NS, claim)
    assert created.status.phase == "Bound" and created.spec.volume_name.startswith("pvc-")
    cluster.core.create_namespaced_secret(
        NS, {"metadata": {"name": "input-key"}, "stringData": {"key": "s3cret", "file.txt": "from-a-file"}}
    )
    volumes = {
        "pod": {
            "securityContext": {"fsGroup": 10001},
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "job-data"}},
                {"name": "keys", "secret": {"secretName": "input-key", "defaultMode": 0o400}},
                {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "4Mi"}},
            ],
        }
    }
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "input-key", "key": "key"}}}]
    mounts = [
        {"name": "data", "mountPath": "/data"},
        {"name": "keys", "mountPath": "/keys", "readOnly": True},
        {"name": "scratch", "mountPath": "/scratch"},
    ]
    write = (
        "set -e; echo tmp > /scratch/t; stat -c %a /keys/file.txt > /data/mode; "
        'echo "$KEY $(cat /keys/file.txt) $(id -u)" > /data/out.txt; ! touch /rootfs-is-ro 2>/dev/null'
    )
    first = cluster.job(
        ["sh", "-c", write],
        container={
            "env": env,
            "volumeMounts": mounts,
            "resources": {"limits": {"memory": "64Mi", "cpu": "500m"}},
        },
        **volumes,
    )
    done = cluster.wait_job(first)
    assert conditions(done) == {"SuccessCriteriaMet": "CompletionsReached", "Complete": "CompletionsReached"}
    assert done.status.succeeded == 1 and done.status.completion_time is not None

    [pod] = cluster.pods(first)
    assert pod.status.phase == "Succeeded" and terminated(pod).reason == "Completed"
    engine = docker.from_env()
    try:
        host = engine.containers.get(pod.status.container_statuses[0].container_id.removeprefix("docker://"))
        config_ = host.attrs["HostConfig"]
        assert (config_["NetworkMode"], config_["ReadonlyRootfs"], config_["CapDrop"]) == (
            "none",
            True,
            ["ALL"],
        )
        assert (config_["Memory"], config_["MemorySwap"], config_["NanoCpus"]) == (
            64 << 20,
            64 << 20,
            5 * 10**8,
        )
        assert "no-new-privileges" in config_["SecurityOpt"] and host.attrs["Config"]["User"] == "10001"
    finally:
        engine.close()

    second = cluster.job(
        ["sh", "-c", "cat /data/out.txt /data/mode"],
        container={"volumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}]},
        **volumes,
    )
    assert "Complete" in conditions(cluster.wait_job(second))
    [reader] = cluster.pods(second)
    assert cluster.core.read_namespaced_pod_log(reader.metadata.name, NS) == "s3cret from-a-file 10001\n440\n"


def test_failing_command_fails_the_job_with_its_exit_code(cluster: Cluster) -> None:
    name = cluster.job(["sh", "-c", "echo failing >&2; exit 7"])
    job = cluster.wait_job(name)
    assert conditions(job) == {"FailureTarget": "BackoffLimitExceeded", "Failed": "BackoffLimitExceeded"}
    assert (job.status.failed, job.status.succeeded, job.status.active) == (1, None, None)
    [pod] = cluster.pods(name)
    assert pod.status.phase == "Failed"
    assert (terminated(pod).exit_code, terminated(pod).reason) == (7, "Error")
    assert cluster.core.read_namespaced_pod_log(pod.metadata.name, NS) == "failing\n"


def test_backoff_limit_retries_with_new_pods(cluster: Cluster) -> None:
    name = cluster.job(["sh", "-c", "exit 1"], backoffLimit=1)
    job = cluster.wait_job(name)
    assert job.status.failed == 2 and "Failed" in conditions(job)
    assert len({p.metadata.name for p in cluster.pods(name)}) == 2


def test_memory_hog_is_oom_killed(cluster: Cluster) -> None:
    hog = ["python3", "-c", "b = []\nwhile True: b.append(bytearray(8 << 20))"]
    name = cluster.job(hog, container={"resources": {"limits": {"memory": "48Mi"}}})
    assert "Failed" in conditions(cluster.wait_job(name))
    [pod] = cluster.pods(name)
    assert (terminated(pod).reason, terminated(pod).exit_code) == ("OOMKilled", 137)


def test_active_deadline_kills_the_pod(cluster: Cluster) -> None:
    started = time.monotonic()
    name = cluster.job(["sleep", "60"], activeDeadlineSeconds=2)
    job = cluster.wait_job(name, timeout_s=30)
    assert 2 <= time.monotonic() - started < 15
    assert conditions(job) == {"FailureTarget": "DeadlineExceeded", "Failed": "DeadlineExceeded"}
    assert job.status.failed == 1
    assert cluster.pods(name) == []  # the controller deletes the active pods
    assert not any(c.labels.get("io.kubernetes.pod.name", "").startswith(name) for c in cluster.containers())


def test_logs_follow_streams_until_exit(cluster: Cluster, tmp_path: Path) -> None:
    """The second line is written only after the test has read the first one from the stream."""
    tmp_path.chmod(0o777)
    script = "echo line 1; while [ ! -e /gate/go ]; do sleep 0.1; done; echo line 2"
    name = cluster.job(
        ["sh", "-c", script],
        container={"volumeMounts": [{"name": "gate", "mountPath": "/gate"}]},
        pod={"volumes": [{"name": "gate", "hostPath": {"path": str(tmp_path)}}]},
    )
    pod = cluster.wait_pod(name, lambda p: p.status.phase == "Running")
    lines = []
    for line in watch.Watch().stream(cluster.core.read_namespaced_pod_log, pod.metadata.name, NS):
        lines.append(line)
        if line == "line 1":
            (tmp_path / "go").touch()
    assert lines == ["line 1", "line 2"]  # and the stream ended when the container did
    assert "Complete" in conditions(cluster.wait_job(name))


def test_logs_of_a_pod_not_started_are_a_bad_request(cluster: Cluster) -> None:
    name = cluster.job(["true"], image="vfed/no-such-image@sha256:" + "0" * 64)
    pod = cluster.wait_pod(
        name,
        lambda p: bool(
            p.status.container_statuses
            and p.status.container_statuses[0].state.waiting.reason in ("ErrImagePull", "ImagePullBackOff")
        ),
    )
    assert "not found" in pod.status.container_statuses[0].state.waiting.message
    code, status = error_of(lambda: cluster.core.read_namespaced_pod_log(pod.metadata.name, NS))
    assert code == 400 and "is waiting to start" in status["message"]
    cluster.batch.delete_namespaced_job(name, NS, propagation_policy="Background")


def test_watch_sees_the_transitions_and_resumes(cluster: Cluster) -> None:
    start = cluster.core.list_namespaced_pod(NS).metadata.resource_version
    name = cluster.job(["sh", "-c", "sleep 1"])
    phases: list[str] = []
    w = watch.Watch()
    for event in w.stream(
        cluster.core.list_namespaced_pod,
        NS,
        label_selector=f"job-name={name}",
        resource_version=start,
        timeout_seconds=30,
    ):
        if not phases or phases[-1] != event["object"].status.phase:
            phases.append(event["object"].status.phase)
        if event["object"].status.phase == "Succeeded":
            w.stop()
    assert phases == ["Pending", "Running", "Succeeded"]

    seen: list[tuple[str, tuple[str, ...]]] = []
    for event in watch.Watch().stream(
        cluster.batch.list_namespaced_job, NS, field_selector=None, label_selector="t=fake", timeout_seconds=2
    ):
        if event["object"].metadata.name == name:
            seen.append((event["type"], tuple(c.type for c in event["object"].status.conditions or [])))
    assert seen == [("ADDED", ("SuccessCriteriaMet", "Complete"))]  # no resourceVersion: the current state

    cluster.fake.compact()  # etcd compaction: a watch from before it is told 410 Expired, after a 200
    with pytest.raises(ApiException) as gone:
        for _ in watch.Watch().stream(
            cluster.core.list_namespaced_pod, NS, resource_version=start, timeout_seconds=5
        ):
            pass
    assert gone.value.status == 410 and "Expired: too old resource version" in str(gone.value.reason)


def test_delete_propagation(cluster: Cluster) -> None:
    background = cluster.job(["sleep", "60"])
    running = cluster.wait_pod(background, lambda p: p.status.phase == "Running")
    cluster.batch.delete_namespaced_job(background, NS, propagation_policy="Background")
    assert error_of(lambda: cluster.batch.read_namespaced_job(background, NS))[0] == 404
    events = []
    for event in watch.Watch().stream(
        cluster.core.list_namespaced_pod,
        NS,
        label_selector=f"job-name={background}",
        resource_version=running.metadata.resource_version,
        timeout_seconds=30,
    ):
        events.append((event["type"], event["object"].metadata.deletion_timestamp is not None))
        if event["type"] == "DELETED":
            break
    assert events[0] == ("MODIFIED", True) and events[-1] == ("DELETED", True)
    assert cluster.pods(background) == []
    assert not [c for c in cluster.containers() if c.labels["io.kubernetes.pod.name"].startswith(background)]

    foreground = cluster.job(["sleep", "60"])
    cluster.wait_pod(foreground, lambda p: p.status.phase == "Running")
    cluster.batch.delete_namespaced_job(
        foreground, NS, body=client.V1DeleteOptions(propagation_policy="Foreground")
    )
    job = cluster.batch.read_namespaced_job(foreground, NS)
    assert job.metadata.deletion_timestamp is not None and job.metadata.finalizers == ["foregroundDeletion"]
    _until(
        lambda: (
            not cluster.batch.list_namespaced_job(NS, label_selector="t=fake").items
            or foreground not in [j.metadata.name for j in cluster.batch.list_namespaced_job(NS).items]
        ),
        "a Foreground-deleted job goes after its pods",
    )
    assert cluster.pods(foreground) == []

    orphaned = cluster.job(["sleep", "60"])
    cluster.wait_pod(orphaned, lambda p: p.status.phase == "Running")
    cluster.batch.delete_namespaced_job(orphaned, NS)  # no policy: Orphan, the batch/v1 default
    [pod] = cluster.pods(orphaned)
    assert pod.status.phase == "Running" and not pod.metadata.owner_references
    answer = cluster.core.delete_namespaced_pod(pod.metadata.name, NS, grace_period_seconds=1)
    assert answer.metadata.deletion_timestamp is not None
    _until(lambda: cluster.pods(orphaned) == [], "a deleted pod goes once its container stopped")


def _until(check: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.2)


# --- injected faults ---------------------------------------------------------------------------------


def test_injected_pull_failure_shows_err_image_pull_then_back_off(cluster: Cluster) -> None:
    name = f"pull-{uuid.uuid4().hex[:6]}"
    cluster.fake.inject_pull_failure(name)
    cluster.job(["true"], name=name)
    reasons: set[str] = set()

    def waiting(pod: client.V1Pod) -> bool:
        statuses = pod.status.container_statuses or []
        if statuses and statuses[0].state.waiting:
            reasons.add(statuses[0].state.waiting.reason)
        return {"ErrImagePull", "ImagePullBackOff"} <= reasons

    pod = cluster.wait_pod(name, waiting)
    assert pod.status.phase == "Pending"
    assert cluster.batch.read_namespaced_job(name, NS).status.active == 1  # a pull error does not fail a Job
    assert cluster.containers() == [] or all(
        not c.labels["io.kubernetes.pod.name"].startswith(name) for c in cluster.containers()
    )
    cluster.batch.delete_namespaced_job(name, NS, propagation_policy="Background")


def test_injected_unschedulable_pod_stays_pending(cluster: Cluster) -> None:
    name = f"unsched-{uuid.uuid4().hex[:6]}"
    cluster.fake.inject_unschedulable(name)
    cluster.job(["true"], name=name)

    def unscheduled(pod: client.V1Pod) -> bool:
        return any(c.type == "PodScheduled" and c.status == "False" for c in pod.status.conditions or [])

    pod = cluster.wait_pod(name, unscheduled)
    [scheduled] = [c for c in pod.status.conditions if c.type == "PodScheduled"]
    assert (pod.status.phase, scheduled.reason) == ("Pending", "Unschedulable")
    assert "0/1 nodes are available" in scheduled.message and pod.spec.node_name is None
    cluster.batch.delete_namespaced_job(name, NS, propagation_policy="Background")
    _until(lambda: cluster.pods(name) == [], "an unscheduled pod is deleted at once")


def test_injected_eviction_fails_the_pod(cluster: Cluster) -> None:
    name = cluster.job(["sleep", "60"])
    pod = cluster.wait_pod(name, lambda p: p.status.phase == "Running")
    cluster.fake.evict(NS, pod.metadata.name)
    job = cluster.wait_job(name)
    assert conditions(job)["Failed"] == "BackoffLimitExceeded"
    [evicted] = cluster.pods(name)
    assert (evicted.status.phase, evicted.status.reason) == ("Failed", "Evicted")
    assert any(
        c.type == "DisruptionTarget" and c.reason == "TerminationByKubelet" for c in evicted.status.conditions
    )


def test_run_as_non_root_refuses_a_root_image(cluster: Cluster) -> None:
    name = cluster.job(["true"], container={"securityContext": {"runAsNonRoot": True}})
    pod = cluster.wait_pod(
        name,
        lambda p: bool(
            p.status.container_statuses
            and p.status.container_statuses[0].state.waiting
            and p.status.container_statuses[0].state.waiting.reason == "CreateContainerConfigError"
        ),
    )
    assert "image will run as root" in pod.status.container_statuses[0].state.waiting.message
    cluster.batch.delete_namespaced_job(name, NS, propagation_policy="Background")


# --- a fake of its own -------------------------------------------------------------------------------


def test_digest_policy_and_nothing_left_after_shutdown(tmp_path: Path) -> None:
    engine = docker.from_env()
    try:
        image_id = engine.images.get(IMAGE).id
        with FakeKubernetes(require_digest=True) as fake:
            label, workdir = fake.label, fake._workdir
            cluster = Cluster(fake, fake.write_kubeconfig(tmp_path / "config"))
            code, status = error_of(lambda: cluster.job(["true"]))
            assert code == 422 and "must be referenced by digest" in status["message"]
            cluster.core.create_namespaced_persistent_volume_claim(
                NS,
                {
                    "metadata": {"name": "left"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
                },
            )
            done = cluster.job(
                ["true"],
                image=f"vfed/base@{image_id}",
                pod={"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "left"}}]},
            )
            assert "Complete" in conditions(cluster.wait_job(done))
            wrong_name = cluster.job(["true"], image=f"vfed/node@{image_id}")
            cluster.wait_pod(
                wrong_name,
                lambda p: bool(p.status.container_statuses and p.status.container_statuses[0].state.waiting),
            )
            running = cluster.job(["sleep", "60"], image=f"vfed/base@{image_id}")
            cluster.wait_pod(running, lambda p: p.status.phase == "Running")
            assert engine.containers.list(all=True, filters={"label": label})
            assert engine.volumes.list(filters={"label": label})
        assert engine.containers.list(all=True, filters={"label": label}) == []
        assert engine.volumes.list(filters={"label": label}) == []
        assert workdir is not None and not workdir.exists()
    finally:
        engine.close()


def test_typed_models_ttl_and_host_path(cluster: Cluster, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    container = client.V1Container(
        name="main",
        image=IMAGE,
        command=["sh", "-c", "echo $(id -u) > /host/seen"],
        security_context=client.V1SecurityContext(run_as_user=10001, run_as_non_root=True),
        volume_mounts=[client.V1VolumeMount(name="host", mount_path="/host")],
    )
    template = client.V1PodTemplateSpec(
        spec=client.V1PodSpec(
            restart_policy="Never",
            containers=[container],
            volumes=[
                client.V1Volume(
                    name="host", host_path=client.V1HostPathVolumeSource(path=str(tmp_path), type="Directory")
                )
            ],
        )
    )
    name = f"typed-{uuid.uuid4().hex[:6]}"
    job = client.V1Job(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1JobSpec(template=template, backoff_limit=0, ttl_seconds_after_finished=1),
    )
    created = cluster.batch.create_namespaced_job(NS, job)
    assert created.spec.template.metadata.labels["job-name"] == name
    assert created.spec.selector.match_labels == {"batch.kubernetes.io/controller-uid": created.metadata.uid}
    assert "Complete" in conditions(cluster.wait_job(name))
    assert (tmp_path / "seen").read_text() == "10001\n"
    _until(
        lambda: name not in [j.metadata.name for j in cluster.batch.list_namespaced_job(NS).items],
        "ttlSecondsAfterFinished deletes the finished job",
    )
    _until(lambda: cluster.pods(name) == [], "and its pods (Background propagation)")


def test_claim_in_use_stays_until_its_pod_ends_and_sub_paths(cluster: Cluster) -> None:
    claim = {
        "metadata": {"name": "busy"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}},
    }
    cluster.core.create_namespaced_persistent_volume_claim(NS, claim)
    volume = f"fakek8s-{cluster.fake.instance_id}-{NS}-busy"
    mounts = [{"name": "d", "mountPath": "/d"}, {"name": "d", "mountPath": "/sub", "subPath": "a/b"}]
    name = cluster.job(
        ["sh", "-c", "echo in-sub > /sub/f; sleep 2; cat /d/a/b/f"],
        container={"volumeMounts": mounts, "securityContext": {}},  # root: subPath folders are
        pod={"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "busy"}}]},
    )  # root's
    cluster.wait_pod(name, lambda p: p.status.phase == "Running")
    cluster.core.delete_namespaced_persistent_volume_claim("busy", NS)
    terminating = cluster.core.read_namespaced_persistent_volume_claim("busy", NS)
    assert terminating.metadata.deletion_timestamp is not None
    assert terminating.metadata.finalizers == ["kubernetes.io/pvc-protection"]
    assert "Complete" in conditions(cluster.wait_job(name))
    _until(
        lambda: error_of(lambda: cluster.core.read_namespaced_persistent_volume_claim("busy", NS))[0] == 404,
        "the claim goes once no pod uses it",
    )
    engine = docker.from_env()
    try:
        _until(lambda: not engine.volumes.list(filters={"name": volume}), "and so does its Docker volume")
    finally:
        engine.close()
    [pod] = cluster.pods(name)
    assert cluster.core.read_namespaced_pod_log(pod.metadata.name, NS) == "in-sub\n"


def test_service_get_and_generate_name(cluster: Cluster) -> None:
    made = cluster.core.create_namespaced_secret(NS, {"metadata": {"generateName": "run-"}, "data": {}})
    assert made.metadata.name.startswith("run-") and len(made.metadata.name) == len("run-") + 5
    assert cluster.core.read_namespaced_secret(made.metadata.name, NS).metadata.uid == made.metadata.uid
    service = {
        "metadata": {"name": "proxy", "labels": {"app": "proxy"}},
        "spec": {"selector": {"app": "proxy"}, "ports": [{"port": 8080}]},
    }
    cluster.core.create_namespaced_service(NS, service)
    found = cluster.core.read_namespaced_service("proxy", NS)
    assert found.spec.cluster_ip.startswith("10.96.") and found.spec.ports[0].target_port == 8080
    assert [
        s.metadata.name for s in cluster.core.list_namespaced_service(NS, label_selector="app=proxy").items
    ] == ["proxy"]


def test_a_crash_inside_the_fake_fails_the_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the kubelet must not leave a Job waiting forever in silence: stop() raises it."""
    import fakek8s_kubelet

    def broken(self: object, reference: str) -> tuple[str, str]:
        raise KeyError(f"no such thing: {reference}")

    monkeypatch.setattr(fakek8s_kubelet.Kubelet, "_local_image", broken)
    fake = FakeKubernetes()
    fake.start()
    try:
        Cluster(fake, fake.write_kubeconfig(tmp_path / "config")).job(["true"], name="doomed")
        _until(lambda: bool(fake.errors), "the crash is recorded")
    finally:
        with pytest.raises(RuntimeError, match="no such thing: vfed/base:latest"):
            fake.stop()
