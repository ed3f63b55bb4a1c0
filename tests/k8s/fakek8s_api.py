"""The HTTP side of the fake Kubernetes API server: routes, handlers, and `Status` answers for errors.

Handlers run on the fake's event loop; they validate, fill server-side defaults and hand Jobs to the Job
controller. See fake_apiserver.py for what is faithful and what is not.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
from aiohttp import web
from fakek8s_core import ApiError, bad_request, check_name, check_selector, invalid, now, validate_body
from fakek8s_jobs import JOBS, PODS, JobController, check_job, job_defaults
from fakek8s_kubelet import LABEL, Kubelet, claim_volume_name
from fakek8s_store import Expired, Kind, Obj, Store

SECRETS = Kind("secrets", "", "v1", "Secret")
CLAIMS = Kind("persistentvolumeclaims", "", "v1", "PersistentVolumeClaim")
SERVICES = Kind("services", "", "v1", "Service")
POLICIES = Kind("networkpolicies", "networking.k8s.io", "v1", "NetworkPolicy")
ENDPOINT_SLICES = Kind("endpointslices", "discovery.k8s.io", "v1", "EndpointSlice")
NAMESPACES = Kind("namespaces", "", "v1", "Namespace")
KINDS = {k.plural: k for k in (JOBS, PODS, SECRETS, CLAIMS, SERVICES, POLICIES, ENDPOINT_SLICES)}
CREATABLE = {"jobs", "secrets", "persistentvolumeclaims", "services", "networkpolicies", "endpointslices"}


def create_app(api: Api) -> web.Application:
    app = web.Application(middlewares=[api.errors])
    app.router.add_routes(_routes(api))
    return app


@dataclass
class Api:
    """The handlers, over the fake's store, kubelet and Job controller."""

    store: Store
    kubelet: Kubelet
    jobs: JobController
    engine: docker.DockerClient
    instance_id: str
    token: str
    require_digest: bool
    failures: list[str]  # the fake's own errors, raised by FakeKubernetes.stop()

    @web.middleware
    async def errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(ApiError(401, "Unauthorized", "Unauthorized"))
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except ApiError as exc:
            return _status(exc)
        except web.HTTPException:
            raise
        except Exception as exc:  # a bug in the fake: answered as the real server would, and kept for stop()
            self.failures.append(f"{request.method} {request.path}: {exc!r}")
            return _status(ApiError(500, "InternalError", f"fakek8s: {exc!r}"))

    def _namespace(self, request: web.Request) -> str:
        ns = request.match_info["namespace"]
        self.store.get(NAMESPACES, "", ns)
        return ns

    async def get_namespace(self, request: web.Request) -> web.Response:
        return web.json_response(self.store.get(NAMESPACES, "", request.match_info["name"]))

    async def create(self, request: web.Request) -> web.Response:
        kind = KINDS[request.match_info["plural"]]
        if kind.plural not in CREATABLE:
            raise ApiError(405, "MethodNotAllowed", f"fakek8s: create is not supported for {kind.plural}")
        ns = self._namespace(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"the object provided is unrecognized: {exc}") from exc
        if not isinstance(body, dict):
            raise bad_request("the object provided is unrecognized (must be a JSON object)")
        body.setdefault("apiVersion", kind.api_version)
        body.setdefault("kind", kind.kind)
        if (body["apiVersion"], body["kind"]) != (kind.api_version, kind.kind):
            raise bad_request(
                f"the API version in the data ({body['apiVersion']}) does not match the expected "
                f"API version ({kind.api_version}) or kind {body['kind']} is not {kind.kind}"
            )
        warnings = validate_body(body, kind.kind, kind.group, request.query.get("fieldValidation", "Strict"))
        meta = body.setdefault("metadata", {})
        if meta.get("namespace") not in (None, ns):
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        if not meta.get("name") and not meta.get("generateName"):
            raise invalid(
                kind.kind,
                kind.group,
                "",
                [("metadata.name", "Required value: name or generateName is required")],
            )
        check_name(kind.kind, kind.group, meta.get("name") or meta["generateName"] + "x")
        for key in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp"):
            meta.pop(key, None)
        body.pop("status", None)
        obj = await getattr(self, f"_create_{kind.plural}")(ns, body)
        response = web.json_response(obj, status=201)
        for warning in warnings:
            response.headers.add("Warning", f'299 - "{warning}"')
        return response

    async def _create_jobs(self, ns: str, body: Obj) -> Obj:
        check_job(body, self.require_digest)
        job = self.store.create(JOBS, ns, body, job_defaults)
        self.jobs.start(job)
        return copy.deepcopy(job)

    async def _create_secrets(self, ns: str, body: Obj) -> Obj:
        data = dict(body.get("data") or {})
        for key, value in data.items():
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise bad_request(
                    f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data '
                    f"in data[{key}]"
                ) from exc
        for key, value in (body.pop("stringData", None) or {}).items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        body["data"] = data
        body.setdefault("type", "Opaque")
        return copy.deepcopy(self.store.create(SECRETS, ns, body))

    async def _create_persistentvolumeclaims(self, ns: str, body: Obj) -> Obj:
        spec = body["spec"]
        spec.setdefault("volumeMode", "Filesystem")
        spec.setdefault("storageClassName", "standard")
        claim = self.store.create(CLAIMS, ns, body)
        meta = claim["metadata"]
        spec["volumeName"] = f"pvc-{meta['uid']}"
        meta["finalizers"] = ["kubernetes.io/pvc-protection"]
        meta["annotations"] = {
            **(meta.get("annotations") or {}),
            "pv.kubernetes.io/bind-completed": "yes",
            "pv.kubernetes.io/bound-by-controller": "yes",
        }
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        claim["status"] = {
            "phase": "Bound",
            "accessModes": spec.get("accessModes", []),
            "capacity": {"storage": storage},
        }
        volume_name = claim_volume_name(self.instance_id, ns, meta["name"])
        self.kubelet.claim_paths[(ns, meta["name"])] = await asyncio.to_thread(self._make_volume, volume_name)
        self.store.update("persistentvolumeclaims", claim)
        return copy.deepcopy(claim)

    def _make_volume(self, name: str) -> str:
        """A Docker volume whose root is writable by any user, as a local-path provisioner's folder is."""
        volume = self.engine.volumes.create(name=name, labels={LABEL: self.instance_id})
        mountpoint = str(volume.attrs["Mountpoint"])
        Path(mountpoint).chmod(0o777)
        return mountpoint

    async def _create_services(self, ns: str, body: Obj) -> Obj:
        spec = body.setdefault("spec", {})
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        used = {s["spec"].get("clusterIP") for s in self.store.list("services", None)}
        spec.setdefault(
            "clusterIP", next(f"10.96.0.{i}" for i in range(10, 255) if f"10.96.0.{i}" not in used)
        )
        spec["clusterIPs"] = [spec["clusterIP"]]
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port["port"])
        body["status"] = {"loadBalancer": {}}
        return copy.deepcopy(self.store.create(SERVICES, ns, body))

    async def _create_endpointslices(self, ns: str, body: Obj) -> Obj:
        """Stored as given: the endpoints of a Service without a selector (the kubelet routes its name)."""
        for port in body.get("ports") or []:
            port.setdefault("protocol", "TCP")
        return copy.deepcopy(self.store.create(ENDPOINT_SLICES, ns, body))

    async def _create_networkpolicies(self, ns: str, body: Obj) -> Obj:
        body["spec"].setdefault("policyTypes", ["Ingress"] + (["Egress"] if "egress" in body["spec"] else []))
        return copy.deepcopy(self.store.create(POLICIES, ns, body))

    async def get(self, request: web.Request) -> web.Response:
        kind = KINDS[request.match_info["plural"]]
        return web.json_response(self.store.get(kind, self._namespace(request), request.match_info["name"]))

    async def list(self, request: web.Request) -> web.StreamResponse:
        kind = KINDS[request.match_info["plural"]]
        ns = self._namespace(request) if "namespace" in request.match_info else None
        selector = request.query.get("labelSelector")
        check_selector(selector)
        if request.query.get("watch") in ("true", "1"):
            return await self._watch(request, kind, ns, selector)
        return web.json_response(
            {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(self.store.rv)},
                "items": self.store.list(kind.plural, ns, selector),
            }
        )

    async def _watch(
        self, request: web.Request, kind: Kind, ns: str | None, selector: str | None
    ) -> web.StreamResponse:
        since_text = request.query.get("resourceVersion", "")
        try:
            since = int(since_text) if since_text not in ("", "0") else None
        except ValueError as exc:
            raise bad_request(f'invalid resource version "{since_text}"') from exc
        timeout_s = _number(request.query.get("timeoutSeconds"), "timeoutSeconds") or None
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def pump() -> None:
            try:
                async for event in self.store.watch(kind.plural, ns, selector, since):
                    line = json.dumps({"type": event.type, "object": event.obj}) + "\n"
                    await response.write(line.encode())
            except Expired as exc:  # after the 200, as the real server's watch cache answers it
                gone = ApiError(410, "Expired", str(exc)).status()
                await response.write((json.dumps({"type": "ERROR", "object": gone}) + "\n").encode())

        with contextlib.suppress(TimeoutError, ConnectionResetError):
            await asyncio.wait_for(pump(), timeout_s)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def delete(self, request: web.Request) -> web.Response:
        kind = KINDS[request.match_info["plural"]]
        ns, name = self._namespace(request), request.match_info["name"]
        options = await _delete_options(request)
        obj = self.store.get(kind, ns, name)
        if kind is JOBS:
            policy = options.get("propagationPolicy") or "Orphan"
            if policy not in ("Orphan", "Background", "Foreground"):
                raise bad_request(f"propagationPolicy: Unsupported value: {policy!r}")
            return web.json_response(await self.jobs.delete(obj, policy))
        if kind is PODS:
            grace = options.get("gracePeriodSeconds")
            if grace is None:
                grace = obj["spec"].get("terminationGracePeriodSeconds", 30)
            grace = _number(grace, "gracePeriodSeconds")
            self.kubelet.mark_deleting(obj, grace)
            answer = copy.deepcopy(obj)
            self.jobs.spawn(self.kubelet.delete(obj, grace))
            return web.json_response(answer)
        if kind is CLAIMS:
            return web.json_response(self._delete_claim(obj))
        self.store.remove(kind.plural, ns, name)
        return web.json_response(obj)

    def _delete_claim(self, claim: Obj) -> Obj:
        """pvc-protection: a claim in use by a live pod stays (Terminating) until no pod uses it."""
        claim["metadata"].setdefault("deletionTimestamp", now())
        self.store.update("persistentvolumeclaims", claim)
        answer = copy.deepcopy(claim)
        self.jobs.spawn(self._remove_claim(claim))
        return answer

    async def _remove_claim(self, claim: Obj) -> None:
        ns, name = claim["metadata"]["namespace"], claim["metadata"]["name"]
        store = self.store

        def unused() -> bool:
            return not any(
                (v.get("persistentVolumeClaim") or {}).get("claimName") == name
                for pod in store.list("pods", ns)
                if pod["status"].get("phase") in ("Pending", "Running")
                for v in pod["spec"].get("volumes") or []
            )

        while not unused():
            await store.next_change()
        claim["metadata"].pop("finalizers", None)
        self.store.remove("persistentvolumeclaims", ns, name)
        self.kubelet.claim_paths.pop((ns, name), None)
        await asyncio.to_thread(self._remove_volume, claim_volume_name(self.instance_id, ns, name))

    def _remove_volume(self, name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.engine.volumes.get(name).remove(force=True)

    async def log(self, request: web.Request) -> web.StreamResponse:
        ns, name = self._namespace(request), request.match_info["name"]
        pod = self.store.get(PODS, ns, name)
        container = pod["spec"]["containers"][0]
        wanted = request.query.get("container", container["name"])
        if wanted != container["name"]:
            raise bad_request(f"container {wanted} is not valid for pod {name}")
        container_id = self.kubelet.container_of(pod)
        if container_id is None:
            statuses = pod["status"].get("containerStatuses") or [{}]
            reason = (statuses[0].get("state", {}).get("waiting") or {}).get("reason", "ContainerCreating")
            raise bad_request(f'container "{wanted}" in pod "{name}" is waiting to start: {reason}')
        options: dict[str, Any] = {
            "stdout": True,
            "stderr": True,
            "timestamps": request.query.get("timestamps") == "true",
        }
        if request.query.get("tailLines"):
            options["tail"] = _number(request.query["tailLines"], "tailLines")
        engine = self.engine
        if request.query.get("follow") != "true":
            text = await asyncio.to_thread(lambda: engine.containers.get(container_id).logs(**options))
            return web.Response(body=text, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def follow() -> None:
            try:
                for chunk in engine.containers.get(container_id).logs(stream=True, follow=True, **options):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except docker.errors.NotFound:
                pass
            finally:
                with contextlib.suppress(RuntimeError):  # the fake is shutting down: nobody reads any more
                    loop.call_soon_threadsafe(queue.put_nowait, None)

        reader = loop.run_in_executor(None, follow)
        with contextlib.suppress(ConnectionResetError):
            while (chunk := await queue.get()) is not None:
                await response.write(chunk)
            await response.write_eof()
        await reader
        return response


def _number(value: object, name: str) -> int:
    """A non-negative integer parameter; anything else is the real server's 400."""
    if value is None or value == "":
        return 0
    try:
        number = int(str(value))
    except ValueError as exc:
        raise bad_request(f"{name}: Invalid value: {value!r}: must be an integer") from exc
    if number < 0:
        raise bad_request(f"{name}: Invalid value: {number}: must be greater than or equal to 0")
    return number


async def _delete_options(request: web.Request) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if request.can_read_body:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            raise bad_request(f"the body of DeleteOptions is not JSON: {exc}") from exc
        if isinstance(body, dict):
            options.update(body)
    for key in ("propagationPolicy", "gracePeriodSeconds"):
        if key in request.query:
            options[key] = request.query[key]
    return options


def _status(error: ApiError) -> web.Response:
    return web.json_response(error.status(), status=error.code)


def _routes(fake: Api) -> list[web.RouteDef]:
    routes = [web.get("/api/v1/namespaces/{name}", fake.get_namespace)]
    for kind in KINDS.values():
        base = "/api/v1" if not kind.group else f"/apis/{kind.group}/{kind.version}"
        one = f"{base}/namespaces/{{namespace}}/{{plural:{kind.plural}}}/{{name}}"
        many = f"{base}/namespaces/{{namespace}}/{{plural:{kind.plural}}}"
        routes += [
            web.post(many, fake.create),
            web.get(many, fake.list),
            web.get(f"{base}/{{plural:{kind.plural}}}", fake.list),
            web.get(one, fake.get),
            web.get(f"{one}/status", fake.get),
            web.delete(one, fake.delete),
        ]
    routes.append(web.get("/api/v1/namespaces/{namespace}/pods/{name}/log", fake.log))
    return routes
