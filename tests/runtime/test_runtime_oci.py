"""The Kubernetes runtime reads image digests and labels from the registry (the OCI distribution API), never
from a Docker engine: against Debian's docker-registry on loopback, open over http, and a second one on the
same storage serving TLS with token auth (tests/docker_registry.py). Needs no cluster: image lookups do not
ask the API server. Runs end to end through the registry in test_runtime_kubernetes.py (a moved tag).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from tests import docker_registry, infra
from tests.docker_registry import Registry, TokenService, htpasswd_line, tiny_image

from vfed.node.runtime import PermanentStartError, RuntimeUnavailable
from vfed.node.runtime.kubernetes import KubernetesRuntime
from vfed.node.runtime.kubernetes_config import KubernetesRuntimeConfig, RegistryEndpoint
from vfed.server import tls_init

pytestmark = [pytest.mark.docker]
LABELS = {"vfed.manifest": '{"methods": {"echo": {}}}', "org.example.team": "oci"}


@dataclass
class Pushed:
    registry: Registry
    name: str
    digest: str

    @property
    def repository(self) -> str:
        return self.name.split("/", 1)[1].split(":", 1)[0]


@pytest.fixture(scope="module")
def tiny(oci_registry: Registry) -> Pushed:
    digest = tiny_image(oci_registry, "oci-test/tiny", "v1", LABELS, "one")
    return Pushed(oci_registry, f"{oci_registry.host}/oci-test/tiny:v1", digest)


def runtime(registry: Registry, **changes: Any) -> KubernetesRuntime:
    settings = KubernetesRuntimeConfig(default_registry=registry.host).model_copy(update=changes)
    return KubernetesRuntime(settings)


def _inspect(ref: str, template: str) -> str:
    return subprocess.run(
        ["docker", "image", "inspect", "--format", template, ref], check=True, capture_output=True, text=True
    ).stdout.strip()


def _engine_labels(ref: str) -> dict[str, str]:
    return dict(json.loads(_inspect(ref, "{{json .Config.Labels}}")))


def _engine_image_id(ref: str) -> str:
    return _inspect(ref, "{{.Id}}")


async def test_digest_and_labels_are_the_pushed_ones(tiny: Pushed) -> None:
    rt = runtime(tiny.registry)
    try:
        assert await rt.image_digest(tiny.name) == tiny.digest  # what `docker push` reported
        assert await rt.image_digest("oci-test/tiny:v1") == tiny.digest  # the default registry's
        assert await rt.image_digest(tiny.digest) == tiny.digest  # a digest resolved here names itself
        assert await rt.image_digest(f"oci-test/tiny@{tiny.digest}") == tiny.digest
        labels = await rt.image_labels(tiny.digest)
        assert labels == _engine_labels(tiny.name) and labels["vfed.manifest"] == LABELS["vfed.manifest"]
        assert await rt.images.pod_image(tiny.digest) == f"{tiny.registry.host}/oci-test/tiny@{tiny.digest}"
    finally:
        await rt.close()


async def test_unknown_images_fail_permanently(tiny: Pushed) -> None:
    rt = runtime(tiny.registry)
    try:
        for missing in ("oci-test/no-such-image:v1", "oci-test/tiny:no-such-tag"):
            with pytest.raises(PermanentStartError, match=r"is not in its registry.*404 .*_UNKNOWN"):
                await rt.image_digest(missing)
            with pytest.raises(PermanentStartError):
                await rt.image_labels(missing)
        with pytest.raises(PermanentStartError, match="was not looked up by name at this node"):
            await rt.image_digest("sha256:" + "e" * 64)
        with pytest.raises(PermanentStartError, match="not an image reference"):
            await rt.image_digest("Not/A//Reference")
    finally:
        await rt.close()
    nobody = runtime(tiny.registry, default_registry=f"127.0.0.1:{infra.free_port()}")
    try:
        with pytest.raises(RuntimeUnavailable, match="ClientConnectorError"):  # retried later, not failed
            await nobody.image_digest("oci-test/tiny:v1")
    finally:
        await nobody.close()


def _flip(path: Path, pattern: bytes) -> None:
    """Change one byte the pattern's group matches, keeping the length: the registry serves it unchecked."""
    data = path.read_bytes()
    found = re.search(pattern, data)
    assert found is not None, (pattern, data[:200])
    at = found.start(1)
    path.write_bytes(data[:at] + (b"7" if data[at : at + 1] != b"7" else b"8") + data[at + 1 :])


async def test_content_that_does_not_match_its_digest_is_refused(oci_registry: Registry) -> None:
    digest = tiny_image(oci_registry, "oci-test/tampered", "v1", {"org.example.n": "1234"}, "one")
    name = f"{oci_registry.host}/oci-test/tampered"
    config_digest = _engine_image_id(f"{name}:v1")  # an image's ID is its config's digest
    _flip(oci_registry.blob_path(config_digest), rb'"org\.example\.n":"(1)234"')
    rt = runtime(oci_registry)
    try:
        assert await rt.image_digest(f"{name}:v1") == digest  # the manifest is intact
        with pytest.raises(
            PermanentStartError, match=f"config {config_digest} arrived as content of .*refused"
        ):
            await rt.image_labels(digest)
    finally:
        await rt.close()
    _flip(oci_registry.blob_path(digest), rb'"size":\s*(\d)')
    rt = runtime(oci_registry)
    try:
        with pytest.raises(PermanentStartError, match=f"registry says manifest {digest} but sent content"):
            await rt.image_digest(f"{name}:v1")
        with pytest.raises(PermanentStartError, match=f"manifest {digest} arrived as content of .*refused"):
            await rt.image_digest(f"{name}@{digest}")
    finally:
        await rt.close()


# --- TLS and token auth ----------------------------------------------------------------------------------


@dataclass
class Guarded:
    registry: Registry
    tokens: TokenService
    ca: Path
    credentials: Path


@pytest.fixture(scope="module")
def guarded(
    oci_registry: Registry, tiny: Pushed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guarded]:
    """The session registry's storage, served over TLS (a private CA) to holders of a token the token
    service signs (its certificate chains to the CA the registry trusts) for the configured user."""
    folder = tmp_path_factory.mktemp("registry-tls")
    certs = tls_init.init(folder / "tls", ["127.0.0.1"])
    chain = [x509.load_pem_x509_certificate(certs.server_cert.read_bytes())]
    tokens = TokenService(certs.server_key.read_bytes(), chain, issuer="vfed-test-issuer", service="vfed-reg")
    with tokens.serving():
        token = {
            "realm": tokens.realm,
            "service": tokens.service,
            "issuer": tokens.issuer,
            "rootcertbundle": str(certs.ca_cert),
        }
        tls = (certs.server_cert, certs.server_key)
        with docker_registry.registry(oci_registry.storage, tls=tls, token=token) as guarded_registry:
            auth = base64.b64encode(f"{tokens.username}:{tokens.password}".encode()).decode()
            credentials = folder / "config.json"
            credentials.write_text(json.dumps({"auths": {guarded_registry.host: {"auth": auth}}}))
            yield Guarded(guarded_registry, tokens, certs.ca_cert, credentials)


def _guarded_runtime(guarded: Guarded, **changes: Any) -> KubernetesRuntime:
    endpoint = RegistryEndpoint(url=f"https://{guarded.registry.host}", ca_file=str(guarded.ca))
    settings: dict[str, Any] = {
        "registries": {guarded.registry.host: endpoint},
        "registry_credentials_file": str(guarded.credentials),
        **changes,
    }
    return runtime(guarded.registry, **settings)


async def test_a_tls_registry_with_token_auth(guarded: Guarded, tiny: Pushed, tmp_path: Path) -> None:
    name = f"{guarded.registry.host}/{tiny.repository}:v1"
    rt = _guarded_runtime(guarded)
    try:
        assert await rt.image_digest(name) == tiny.digest
        assert await rt.image_labels(name) == _engine_labels(tiny.name)
    finally:
        await rt.close()
    asked = guarded.tokens.requests[-1]
    assert asked["query"] == {"scope": f"repository:{tiny.repository}:pull", "service": "vfed-reg"}
    assert asked["authorization"].startswith("Basic ")  # the configured credentials, to the token service

    host = guarded.registry.host  # without ca_file below: the system's CAs, which do not know this one
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"auths": {guarded.registry.host: {"username": "reader", "password": "no"}}}))
    for changes, error, match in [
        ({"registry_credentials_file": str(wrong)}, PermanentStartError, "token service .* answered 401"),
        ({"registry_credentials_file": None}, PermanentStartError, "token service .* answered 401"),
        (
            {"registries": {host: RegistryEndpoint(url=f"https://{host}")}},
            RuntimeUnavailable,
            "CERTIFICATE_VERIFY",
        ),
        ({"registry_credentials_file": str(tmp_path / "absent.json")}, RuntimeUnavailable, "absent.json"),
    ]:
        rt = _guarded_runtime(guarded, **changes)
        try:
            with pytest.raises(error, match=match):
                await rt.image_digest(name)
        finally:
            await rt.close()


async def test_a_registry_asking_for_basic_credentials(
    oci_registry: Registry, tiny: Pushed, tmp_path: Path
) -> None:
    """Basic auth (htpasswd) over loopback http: the configured credentials are sent when asked for."""
    users = tmp_path / "htpasswd"
    users.write_text(htpasswd_line("reader", "s3cret-pw") + "\n")
    with docker_registry.registry(oci_registry.storage, htpasswd=users) as basic:
        name = f"{basic.host}/{tiny.repository}:v1"

        def credentials(password: str) -> str:
            path = tmp_path / f"auth-{password}.json"
            path.write_text(json.dumps({"auths": {basic.host: {"username": "reader", "password": password}}}))
            return str(path)

        for settings, error in [
            ({"registry_credentials_file": credentials("s3cret-pw")}, None),
            ({"registry_credentials_file": credentials("wrong")}, "answered 401"),
            ({}, "asks for credentials; none are set"),
        ]:
            rt = runtime(basic, **settings)
            try:
                if error is None:
                    assert await rt.image_digest(name) == tiny.digest
                    assert await rt.image_labels(name) == _engine_labels(tiny.name)
                else:
                    with pytest.raises(PermanentStartError, match=error):
                        await rt.image_digest(name)
            finally:
                await rt.close()
