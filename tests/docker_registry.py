"""Real OCI registries for the tests: Debian's `docker-registry` (distribution 2.8) on free loopback ports.

`registry()` runs one on a storage folder; a second one on the same folder serves the same images with other
settings (TLS, token auth), so images are pushed once, with `docker push`, to the open one (the Docker engine
treats 127.0.0.0/8 as an insecure registry: plain http). `TokenService` is the token server of the Docker
token protocol: it checks basic credentials and answers a JWT the registry verifies against its CA bundle.
Images are tiny (`tiny_image`: dash and its libc FROM scratch), and removed from the engine afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests import infra

BINARY = "/usr/bin/docker-registry"
TINY_FILES = ("/bin/dash", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2")
"""A shell and what it links: enough for `sh -c` with builtins in an image of about 2 MB."""


@dataclass
class Registry:
    """One running registry: its host:port (as image references name it) and storage folder."""

    host: str
    storage: Path
    proc: subprocess.Popen[bytes]
    log: Path
    pushed: list[str] = field(default_factory=list)
    """IDs of the images built for it: removed from the engine with it (a moved tag leaves the old one)."""

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob (a manifest is a blob too)."""
        hexa = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, timeout=300).stdout


@contextmanager
def registry(
    storage: Path | None = None,
    *,
    tls: tuple[Path, Path] | None = None,
    token: dict[str, str] | None = None,
    htpasswd: Path | None = None,
) -> Iterator[Registry]:
    """A registry on 127.0.0.1:<free port>; `tls` (certificate, key) serves https, `token` (realm, service,
    issuer, rootcertbundle) asks for bearer tokens, `htpasswd` (a file of `htpasswd_line`s) for basic
    credentials. Stopped, and its own folders removed, on exit."""
    if not Path(BINARY).exists():
        infra.missing("docker-registry", f"no {BINARY} (apt-get install docker-registry; make infra)")
    work = Path(tempfile.mkdtemp(prefix="vfed-registry-"))
    storage = storage or work / "storage"
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(5):
            port = infra.free_port()
            config: dict[str, Any] = {
                "version": 0.1,
                "log": {"level": "warn", "accesslog": {"disabled": True}},
                "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
                "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
            }
            if tls is not None:
                config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
            if token is not None:
                config["auth"] = {"token": token}
            if htpasswd is not None:
                config["auth"] = {"htpasswd": {"realm": "vfed-test", "path": str(htpasswd)}}
            (work / "config.yml").write_text(yaml.safe_dump(config))
            log = work / "registry.log"
            with log.open("ab") as out:
                started = subprocess.Popen(
                    [BINARY, "serve", str(work / "config.yml")], stdout=out, stderr=out
                )
            proc = started
            try:
                infra.wait_for_port(port, 10, lambda s=started: s.poll() is None)
                break
            except (RuntimeError, TimeoutError):
                infra.stop(proc)
                proc = None
        if proc is None:
            raise RuntimeError(
                f"docker-registry did not start:\n{(work / 'registry.log').read_text()[-2000:]}"
            )
        found = Registry(f"127.0.0.1:{port}", storage, proc, work / "registry.log")
        try:
            yield found
        finally:
            for image_id in found.pushed:
                with contextlib.suppress(subprocess.CalledProcessError):
                    _docker("image", "rm", "--force", image_id)
    finally:
        if proc is not None:
            infra.stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def htpasswd_line(user: str, password: str) -> str:
    """`user:<bcrypt hash>`, the only kind the registry's htpasswd accepts (libxcrypt through the standard
    library's crypt, deprecated but present up to Python 3.12; no bcrypt package is installed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    return f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))}"


def tiny_image(reg: Registry, repository: str, tag: str, labels: dict[str, str], version: str) -> str:
    """Build a tiny image (dash FROM scratch, /version holding `version`) as reg/repository:tag with
    `labels`, push it, and return the manifest digest the push reports. The engine's copy goes with `reg`."""
    ref = f"{reg.host}/{repository}:{tag}"
    with tempfile.TemporaryDirectory(prefix="vfed-tiny-") as d:
        root = Path(d) / "root"
        for name in TINY_FILES:
            target = root / name.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(name).resolve(), target)
        (root / "bin" / "dash").rename(root / "bin" / "sh")
        (root / "version").write_text(version + "\n")
        (Path(d) / "Dockerfile").write_text("FROM scratch\nCOPY root/ /\nUSER 10001\n")
        label_args = [arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]
        reg.pushed.append(_docker("build", "-q", "-t", ref, *label_args, d).strip())
    _docker("push", ref)
    digests = json.loads(_docker("image", "inspect", "--format", "{{json .RepoDigests}}", ref))
    [digest] = [d.split("@", 1)[1] for d in digests if d.startswith(f"{reg.host}/{repository}@")]
    return str(digest)


@dataclass
class TokenService:
    """The token server a registry's Bearer challenge names (realm): basic credentials in, a signed JWT out,
    granting what was asked for to the one known user."""

    key_pem: bytes
    chain: list[x509.Certificate]
    issuer: str
    service: str
    username: str = "reader"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def issue(self, scope: str) -> str:
        access = []
        if scope:
            kind, name, actions = scope.split(":", 2)
            access = [{"type": kind, "name": name, "actions": actions.split(",")}]
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": self.username,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        x5c = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in self.chain]
        return jwt.encode(claims, self.key_pem, algorithm="ES256", headers={"x5c": x5c})

    @contextmanager
    def serving(self) -> Iterator[TokenService]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                sent = self.headers.get("Authorization", "")
                service.requests.append({"query": query, "authorization": sent})
                wanted = (
                    "Basic " + base64.b64encode(f"{service.username}:{service.password}".encode()).decode()
                )
                if sent != wanted:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps(
                    {"token": service.issue(query.get("scope", "")), "expires_in": 300}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(server.server_address[1])
        thread = threading.Thread(target=server.serve_forever, name="token-service", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()
            thread.join(10)
