"""The images a Kubernetes node runs, read from the Docker engine that holds them (the node's own engine, the
one loading images for the cluster): their IDs, labels, and the `name@sha256:<ID>` a pod names them by.

The cluster is never asked: the Kubernetes API has no image metadata. Blocking; the runtime calls it in its
thread pool.
"""

from __future__ import annotations

from typing import Any

import docker
import docker.errors

from vfed.node.runtime.base import PermanentStartError, RuntimeUnavailable


class ClusterImages:
    """Lazily connected; `close` releases the engine connection."""

    def __init__(self, engine_url: str | None) -> None:
        self.engine_url = engine_url
        self._engine: docker.DockerClient | None = None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
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

    def digest(self, image: str) -> str:
        return str(self._image(image).id)

    def labels(self, image: str) -> dict[str, str]:
        found = self._image(image).labels or {}
        return {str(k): str(v) for k, v in found.items()}

    def pod_image(self, image: str) -> str:
        """`name@sha256:...` for a pod: the image's ID, with the name it is known by here (an image given
        by its bare ID takes the repository of its first tag)."""
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
