"""The images a Kubernetes node runs: their digests, labels, and the `name@sha256:...` a pod names them by.

The Kubernetes API has no image metadata, so the node asks where the cluster pulls from: the registry, over
the OCI distribution API (`RegistryImages`, the default), or, when the config asks for it, a Docker engine the
cluster's nodes share (`EngineImages`). Either way a pod names its image by the digest the policy allowed,
never by a tag: a tag moved after the check cannot swap in another image.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import docker
import docker.errors

from vfed.node.runtime.base import PermanentStartError, RuntimeUnavailable
from vfed.node.runtime.kubernetes_config import KubernetesRuntimeConfig
from vfed.node.runtime.oci_registry import DIGEST, ImageRef, Manifest, RegistryClient, parse_reference


class ClusterImages(Protocol):
    async def digest(self, image: str) -> str: ...

    async def labels(self, image: str) -> dict[str, str]: ...

    async def pod_image(self, image: str) -> str: ...

    async def close(self) -> None: ...


def cluster_images(config: KubernetesRuntimeConfig) -> ClusterImages:
    if config.image_source == "engine":
        return EngineImages(config.image_engine_url)
    return RegistryImages(config)


class RegistryImages:
    """Digests and labels from the registry. A digest resolved here is remembered with the name it was
    resolved by (the agent starts runs by the bare digest its policy checked); content is immutable, so the
    labels read for a digest are kept too. Tags are never cached: each lookup asks the registry again."""

    def __init__(self, config: KubernetesRuntimeConfig) -> None:
        self.default_registry = config.default_registry
        self.client = RegistryClient(
            endpoints=config.registries,
            credentials_file=config.registry_credentials_file,
            platform=config.image_platform,
            timeout_s=config.registry_timeout_s,
        )
        self._names: dict[str, ImageRef] = {}
        self._manifests: dict[tuple[str, str], Manifest] = {}
        """(name, digest asked for) -> the manifest found: an index's digest maps to its platform's image."""
        self._labels: dict[str, dict[str, str]] = {}

    async def close(self) -> None:
        await self.client.close()

    def _ref(self, image: str) -> ImageRef:
        if DIGEST.fullmatch(image):
            known = self._names.get(image)
            if known is None:
                raise PermanentStartError(f"image {image} was not looked up by name at this node")
            return known
        try:
            return parse_reference(image, self.default_registry)
        except ValueError as exc:
            raise PermanentStartError(str(exc)) from exc

    async def _manifest(self, image: str) -> Manifest:
        ref = self._ref(image)
        if ref.digest is not None and (ref.name, ref.digest) in self._manifests:
            return self._manifests[(ref.name, ref.digest)]
        await self.client.open()
        found = await self.client.manifest(ref)
        self._names[found.digest] = found.ref
        self._manifests[(ref.name, found.digest)] = found
        if ref.digest is not None:
            self._manifests[(ref.name, ref.digest)] = found
        return found

    async def digest(self, image: str) -> str:
        """The digest of the image's manifest (the configured platform's, for an index)."""
        return (await self._manifest(image)).digest

    async def labels(self, image: str) -> dict[str, str]:
        manifest = await self._manifest(image)
        if manifest.digest not in self._labels:
            self._labels[manifest.digest] = await self.client.labels(manifest)
        return dict(self._labels[manifest.digest])

    async def pod_image(self, image: str) -> str:
        """`registry/name@sha256:...`, fully qualified (the cluster's own default registry may differ)."""
        manifest = await self._manifest(image)
        return f"{manifest.ref.name}@{manifest.digest}"


class EngineImages:
    """Image IDs and labels from a Docker engine the cluster's nodes share; pods name `name@sha256:<ID>`.
    Lazily connected; the engine's blocking client runs in threads."""

    def __init__(self, engine_url: str | None) -> None:
        self.engine_url = engine_url
        self._engine: docker.DockerClient | None = None

    async def close(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
            self._engine = None

    def _image(self, image: str) -> Any:
        try:
            if self._engine is None:
                url = self.engine_url
                self._engine = docker.DockerClient(base_url=url) if url else docker.from_env()
            return self._engine.images.get(image)
        except docker.errors.ImageNotFound as exc:
            raise PermanentStartError(f"image {image} is not present: {exc.explanation}") from exc
        except docker.errors.DockerException as exc:
            raise RuntimeUnavailable(f"image {image}: image engine error: {exc}") from exc

    async def digest(self, image: str) -> str:
        return str((await asyncio.to_thread(self._image, image)).id)

    async def labels(self, image: str) -> dict[str, str]:
        found = (await asyncio.to_thread(self._image, image)).labels or {}
        return {str(k): str(v) for k, v in found.items()}

    async def pod_image(self, image: str) -> str:
        return await asyncio.to_thread(self._pod_image, image)

    def _pod_image(self, image: str) -> str:
        """The image's ID, with the name it is known by here (an image given by its bare ID takes the
        repository of its first tag)."""
        if "@sha256:" in image:
            return image
        found = self._image(image)
        if image.startswith("sha256:"):
            tags = list(found.tags or [])
            if not tags:
                raise PermanentStartError(f"image {image} has no name the cluster could pull it by")
            name = tags[0]
        else:
            name = image
        last = name.rsplit("/", 1)[-1]
        repository = name[: len(name) - len(last)] + last.split(":", 1)[0]
        return f"{repository}@{found.id}"
