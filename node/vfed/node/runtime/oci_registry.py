"""A small client of the OCI distribution API (a registry's `/v2/`): a reference to its manifest digest, and
an image's labels from its config blob. Every byte read is checked against the digest that names it, so a
registry (or anything between) can make a lookup fail but cannot swap an image.

Answers what the Kubernetes runtime needs without a Docker engine: the cluster pulls by the digest read here.
Auth: a Bearer challenge is answered with a token from the registry's token service (sent the configured basic
credentials, if any), a Basic challenge with the basic credentials. Errors are the runtime boundary's:
PermanentStartError (no such image, refused, content that does not match its digest), RuntimeUnavailable
(the registry does not answer, or answers 5xx/429).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from vfed.node.runtime.base import PermanentStartError, RuntimeUnavailable
from vfed.node.runtime.kubernetes_config import RegistryEndpoint, is_loopback

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""Registries refuse bigger manifests; a bigger answer is not read."""
MAX_CONFIG_BYTES = 16 * 1024 * 1024
DOCKER_HUB = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HUB_API = "https://registry-1.docker.io"
_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_CHALLENGE_PARAM = re.compile(r'([A-Za-z]+)="([^"]*)"')
_TOKEN_MARGIN_S = 10.0


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference: registry host[:port], repository, and a tag or a digest (or both)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def at(self, digest: str) -> ImageRef:
        return ImageRef(self.registry, self.repository, None, digest)

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def _is_host(part: str) -> bool:
    return "." in part or ":" in part or part == "localhost" or part.startswith("[")


def parse_reference(image: str, default_registry: str) -> ImageRef:
    """`[host[:port]/]path[:tag][@sha256:...]` as Docker reads it; ValueError when it is not one."""
    rest, _, digest = image.partition("@")
    if digest and not DIGEST.fullmatch(digest):
        raise ValueError(f"{image!r}: only sha256 digests (sha256:<64 hex>) are supported")
    head, slash, last = rest.rpartition("/")
    tag = None
    if ":" in last:
        last, tag = last.split(":", 1)
        if not _TAG.fullmatch(tag):
            raise ValueError(f"{image!r}: bad tag {tag!r}")
    path = f"{head}{slash}{last}"
    first, _, remainder = path.partition("/")
    registry, repository = (first, remainder) if remainder and _is_host(first) else (default_registry, path)
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    if not repository or not all(_COMPONENT.fullmatch(c) for c in repository.split("/")):
        raise ValueError(f"{image!r} is not an image reference")
    if tag is None and not digest:
        tag = "latest"
    return ImageRef(registry, repository, tag, digest or None)


def load_credentials(path: str) -> dict[str, str]:
    """Registry host -> its basic Authorization header, from a Docker config.json (`auths`); ValueError when
    unreadable."""
    try:
        data = json.loads(Path(path).read_text())
        auths = data.get("auths") or {}
        found: dict[str, str] = {}
        for key, entry in auths.items():
            if entry.get("auth"):
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            else:
                user, password = entry.get("username"), entry.get("password")
            if not user or password is None:
                continue
            found[_auth_host(key)] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        return found
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"registry credentials file {path}: {type(exc).__name__}: {exc}") from exc


def _auth_host(key: str) -> str:
    """The registry host[:port] an `auths` key names (`https://host:port/v1/`, `host:port`, `host`)."""
    if "://" in key:
        url = URL(key)
        host = (url.host or "") + (f":{url.port}" if url.explicit_port else "")
    else:
        host = key.split("/", 1)[0]
    return DOCKER_HUB if key == _HUB_AUTH_KEY or host in _HUB_ALIASES else host


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """An image manifest (one platform's), found for a reference."""

    ref: ImageRef
    digest: str
    config_digest: str


class RegistryClient:
    """Reads manifests and config blobs; keeps the session and the registries' tokens, nothing else.

    Open it in the loop that uses it (`async with`); credentials are read when it opens."""

    def __init__(
        self,
        *,
        endpoints: Mapping[str, RegistryEndpoint],
        credentials_file: str | None,
        platform: str,
        timeout_s: float,
    ) -> None:
        self.endpoints = dict(endpoints)
        self.credentials_file = credentials_file
        self.platform = platform.split("/")
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._credentials: dict[str, str] = {}
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._ssl: dict[str, ssl.SSLContext | bool] = {}

    async def open(self) -> None:
        if self._session is not None:
            return
        if self.credentials_file is not None:
            try:
                self._credentials = await asyncio.to_thread(load_credentials, self.credentials_file)
            except ValueError as exc:
                raise RuntimeUnavailable(str(exc)) from exc
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- where and how

    def base_url(self, registry: str) -> URL:
        endpoint = self.endpoints.get(registry)
        if endpoint is not None and endpoint.url is not None:
            return URL(endpoint.url.rstrip("/"))
        if registry == DOCKER_HUB:
            return URL(_HUB_API)
        host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
        scheme = "http" if is_loopback(host.strip("[]")) else "https"
        return URL(f"{scheme}://{registry}")

    def _ssl_for(self, registry: str) -> ssl.SSLContext | bool:
        if registry not in self._ssl:
            endpoint = self.endpoints.get(registry)
            if endpoint is not None and endpoint.ca_file is not None:
                try:
                    self._ssl[registry] = ssl.create_default_context(cafile=endpoint.ca_file)
                except (OSError, ssl.SSLError) as exc:
                    detail = f"registry {registry}: CA file {endpoint.ca_file}: {exc}"
                    raise RuntimeUnavailable(detail) from exc
            else:
                self._ssl[registry] = True
        return self._ssl[registry]

    def _check_secure(self, ref: ImageRef, url: URL) -> None:
        """Credentials go over TLS, to loopback, or to a registry configured insecure; else no lookup."""
        endpoint = self.endpoints.get(ref.registry)
        if url.scheme == "https" or is_loopback(url.host or "") or (endpoint and endpoint.insecure):
            return
        raise PermanentStartError(f"registry {ref.registry}: credentials are not sent over plain http")

    # -- the API

    async def manifest(self, ref: ImageRef) -> Manifest:
        """The manifest `ref` names, for the configured platform when it names an index."""
        body, media_type, digest = await self._manifest_bytes(ref, ref.digest or str(ref.tag))
        if media_type in INDEX_TYPES:
            chosen = self._pick_platform(ref, _json(body, ref))
            body, media_type, digest = await self._manifest_bytes(ref, chosen)
        if media_type not in MANIFEST_TYPES:
            raise PermanentStartError(f"image {ref}: unsupported manifest type {media_type!r}")
        config = _json(body, ref).get("config") or {}
        config_digest = str(config.get("digest") or "")
        if not DIGEST.fullmatch(config_digest):
            raise PermanentStartError(f"image {ref}: its manifest names no sha256 config")
        return Manifest(ref.at(digest), digest, config_digest)

    async def labels(self, manifest: Manifest) -> dict[str, str]:
        """The image's labels (its config's `config.Labels`)."""
        ref = manifest.ref
        path = f"/v2/{ref.repository}/blobs/{manifest.config_digest}"
        body, _ = await self._get(ref, path, "application/json", MAX_CONFIG_BYTES)
        _check_digest(ref, "config", manifest.config_digest, body)
        labels = (_json(body, ref).get("config") or {}).get("Labels") or {}
        if not isinstance(labels, dict):
            raise PermanentStartError(f"image {ref}: its config's Labels is not a mapping")
        return {str(k): str(v) for k, v in labels.items()}

    async def _manifest_bytes(self, ref: ImageRef, reference: str) -> tuple[bytes, str, str]:
        path = f"/v2/{ref.repository}/manifests/{reference}"
        body, headers = await self._get(ref, path, ACCEPT, MAX_MANIFEST_BYTES)
        digest = sha256_digest(body)
        if DIGEST.fullmatch(reference):
            _check_digest(ref, "manifest", reference, body)
        claimed = headers.get("Docker-Content-Digest")
        if claimed and claimed != digest:  # for a tag, the registry's own word is all there is to check
            raise PermanentStartError(
                f"image {ref}: registry says manifest {claimed} but sent content of {digest}: refused"
            )
        parsed = _json(body, ref)
        media_type = str(parsed.get("mediaType") or headers.get("Content-Type", "").split(";")[0])
        return body, media_type, digest

    def _pick_platform(self, ref: ImageRef, index: dict[str, Any]) -> str:
        want_os, want_arch, *variant = self.platform
        for entry in index.get("manifests") or []:
            platform = entry.get("platform") or {}
            if (platform.get("os"), platform.get("architecture")) != (want_os, want_arch):
                continue
            if variant and platform.get("variant") != variant[0]:
                continue
            digest = str(entry.get("digest") or "")
            if DIGEST.fullmatch(digest):
                return digest
        raise PermanentStartError(f"image {ref} has no {'/'.join(self.platform)} image")

    async def _get(self, ref: ImageRef, path: str, accept: str, max_bytes: int) -> tuple[bytes, Any]:
        """GET with the registry's auth dance: at most one challenge answered per request."""
        if self._session is None:
            raise RuntimeUnavailable("registry client is not open")
        url = self.base_url(ref.registry).with_path(path, encoded=False)
        scope = f"repository:{ref.repository}:pull"
        headers = {"Accept": accept}
        token = self._tokens.get((ref.registry, scope))
        if token is not None and token[1] > time.monotonic():
            headers["Authorization"] = f"Bearer {token[0]}"
        for attempt in range(2):
            status, answer_headers, body = await self._fetch(ref, url, headers, max_bytes)
            if status == 200:
                return body, answer_headers
            if status != 401 or attempt == 1:
                break
            headers["Authorization"] = await self._answer(ref, url, answer_headers, scope)
        raise _status_error(ref, status, body)

    async def _fetch(
        self, ref: ImageRef, url: URL, headers: dict[str, str], max_bytes: int
    ) -> tuple[int, Any, bytes]:
        assert self._session is not None
        try:
            async with self._session.get(url, headers=headers, ssl=self._ssl_for(ref.registry)) as answer:
                length = answer.content_length
                if answer.status == 200 and length is not None and length > max_bytes:
                    raise PermanentStartError(f"image {ref}: {url.path} is over {max_bytes} bytes")
                body = await answer.content.read(max_bytes + 1)
                if len(body) > max_bytes:
                    raise PermanentStartError(f"image {ref}: {url.path} is over {max_bytes} bytes")
                return answer.status, answer.headers, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RuntimeUnavailable(f"registry {ref.registry}: {type(exc).__name__}: {exc}") from exc

    async def _answer(self, ref: ImageRef, url: URL, headers: Any, scope: str) -> str:
        """The Authorization header for a 401's challenge."""
        challenge = str(headers.get("WWW-Authenticate") or "")
        scheme, _, rest = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(rest))
        basic = self._credentials.get(ref.registry)
        if scheme.lower() == "basic":
            if basic is None:
                raise PermanentStartError(f"registry {ref.registry} asks for credentials; none are set")
            self._check_secure(ref, url)
            return basic
        if scheme.lower() != "bearer" or "realm" not in params:
            raise PermanentStartError(f"registry {ref.registry}: unsupported challenge {scheme!r}")
        token, expires_s = await self._token(ref, URL(params["realm"]), params.get("service"), scope, basic)
        self._tokens[(ref.registry, scope)] = (token, time.monotonic() + expires_s - _TOKEN_MARGIN_S)
        return f"Bearer {token}"

    async def _token(
        self, ref: ImageRef, realm: URL, service: str | None, scope: str, basic: str | None
    ) -> tuple[str, float]:
        assert self._session is not None
        if realm.scheme not in ("http", "https") or not realm.host:
            raise PermanentStartError(f"registry {ref.registry}: bad token realm {realm}")
        query = {"scope": scope, **({"service": service} if service else {})}
        headers = {}
        if basic is not None:
            self._check_secure(ref, realm)
            headers["Authorization"] = basic
        try:
            async with self._session.get(
                realm.update_query(query), headers=headers, ssl=self._ssl_for(ref.registry)
            ) as answer:
                body = await answer.content.read(MAX_MANIFEST_BYTES)
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RuntimeUnavailable(f"registry {ref.registry} token service: {exc}") from exc
        if status != 200:
            raise _status_error(ref, status, body, what="token service")
        data = _json(body, ref)
        token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token:
            raise PermanentStartError(f"registry {ref.registry}: the token service answered no token")
        expires = data.get("expires_in")
        return token, float(expires) if isinstance(expires, int | float) and expires > 0 else 60.0


def _json(body: bytes, ref: ImageRef) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise PermanentStartError(f"image {ref}: the registry answered something that is not JSON") from exc
    if not isinstance(parsed, dict):
        raise PermanentStartError(f"image {ref}: the registry answered JSON that is not an object")
    return parsed


def _check_digest(ref: ImageRef, what: str, digest: str, body: bytes) -> None:
    got = sha256_digest(body)
    if got != digest:
        raise PermanentStartError(f"image {ref}: {what} {digest} arrived as content of {got}: refused")


def _status_error(ref: ImageRef, status: int, body: bytes, what: str = "registry") -> Exception:
    """What an answer other than 200 means for the run; the registry's error codes, not its prose."""
    try:
        codes = ",".join(str(e.get("code")) for e in json.loads(body).get("errors") or [])
    except (ValueError, AttributeError, UnicodeDecodeError):
        codes = ""
    detail = f"{what} {ref.registry} answered {status}" + (f" ({codes})" if codes else "")
    if status == 429 or status >= 500:
        return RuntimeUnavailable(f"image {ref}: {detail}")
    if status == 404:
        return PermanentStartError(f"image {ref} is not in its registry: {detail}")
    return PermanentStartError(f"image {ref}: {detail}")
