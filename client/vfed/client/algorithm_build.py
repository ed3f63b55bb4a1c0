"""`vfed algorithm build`: an algorithm image, labelled with what the node reads before it runs one.

The folder's Dockerfile is built with the image builder `vnode image build` uses (vfed.common.image_build),
as a stage image under a temporary tag. Then the stage image itself is asked, with no network and no
capabilities, for the module's manifest (`python3 -m vfed.algorithms --manifest`) and for the versions its
SDK speaks (vfed.common.sdk.SDK_PROBE); both go into labels of the final image (`vfed.manifest`,
`vfed.sdk`), made `FROM` the stage image, and the temporary tag is removed. Asking the built image, not this
installation, is what makes the labels true of the image whatever vfed built it.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import click
import docker.errors
from docker import DockerClient
from pydantic import ValidationError

from vfed.common.image_build import ImageBuildError, build_one, relabel
from vfed.common.manifest import MANIFEST_LABEL, Manifest
from vfed.common.sdk import SDK_LABEL, SDK_PROBE, SdkInfo

DEFAULT_BASE = "vfed/algorithm-base"
BASE_ARG = "VFED_ALGORITHM_BASE"
BUILT_BY = "vfed algorithm build"
PROBE_TIMEOUT_S = 120
LOG_TAIL = 20


class BuildUsageError(ImageBuildError):
    """The command's input cannot be used (a usage error)."""


@dataclass(frozen=True)
class BuiltAlgorithm:
    tag: str
    image_id: str
    manifest: Manifest
    sdk: SdkInfo


def _base_of(dockerfile: Path, base_image: str | None) -> tuple[dict[str, str], str | None]:
    """The build args and the base image to check for: the Dockerfile's FROM ${VFED_ALGORITHM_BASE}."""
    text = dockerfile.read_text(errors="replace")
    if re.search(rf"^\s*ARG\s+{BASE_ARG}\b", text, re.MULTILINE | re.IGNORECASE) is None:
        if base_image:
            raise BuildUsageError(
                f"--base-image: {dockerfile} does not declare ARG {BASE_ARG} (FROM ${{{BASE_ARG}}})"
            )
        return {}, None
    base = base_image or DEFAULT_BASE
    return {BASE_ARG: base}, base


def _present(client: DockerClient, image: str) -> bool:
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def _ask(client: DockerClient, image: str, command: list[str], what: str) -> str:
    """What the image prints for `python3 COMMAND` (no network, no capabilities); the container goes."""
    try:
        container = client.containers.create(
            image, command, entrypoint=["python3"], network_mode="none", cap_drop=["ALL"], detach=True
        )
    except docker.errors.APIError as exc:
        raise ImageBuildError(f"{what}: {exc.explanation}") from None
    try:
        container.start()
        status = container.wait(timeout=PROBE_TIMEOUT_S)
        out = container.logs(stdout=True, stderr=False).decode(errors="replace")
        if status.get("StatusCode") != 0:
            err = container.logs(stdout=False, stderr=True).decode(errors="replace")
            for line in (err or out).splitlines()[-LOG_TAIL:]:
                click.echo(f"    {line}", err=True)
            raise ImageBuildError(f"{what}: the image's python3 exited {status.get('StatusCode')}")
        return out.strip()
    except (docker.errors.DockerException, OSError) as exc:  # requests' timeouts are OSErrors
        raise ImageBuildError(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from None
    finally:
        with contextlib.suppress(docker.errors.DockerException, OSError):
            container.remove(force=True)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _manifest(client: DockerClient, stage: str) -> Manifest:
    text = _ask(client, stage, ["-m", "vfed.algorithms", "--manifest"], "the SDK could not read the manifest")
    try:
        manifest = Manifest.model_validate(json.loads(text.splitlines()[-1] if text else ""))
    except (ValueError, ValidationError):
        raise ImageBuildError("the image printed no valid manifest (is vfed.algorithms its SDK?)") from None
    if not manifest.functions:
        raise ImageBuildError(
            "the module declares no function (@federated or @central): a task could call nothing"
        )
    return manifest


def _sdk(client: DockerClient, stage: str) -> SdkInfo:
    text = _ask(client, stage, ["-c", SDK_PROBE], "the image's SDK versions could not be read")
    try:
        return SdkInfo.model_validate(json.loads(text.splitlines()[-1] if text else ""))
    except (ValueError, ValidationError):
        raise ImageBuildError("the image printed no valid SDK versions") from None


def build_algorithm(
    client: DockerClient,
    folder: Path,
    tag: str,
    base_image: str | None = None,
    labels: dict[str, str] | None = None,
) -> BuiltAlgorithm:
    """Build folder/Dockerfile as `tag`, with the manifest and SDK labels; the temporary stage tag goes."""
    try:
        return _build(client, folder, tag, base_image, labels or {})
    except ImageBuildError:
        raise
    except (docker.errors.DockerException, OSError) as exc:  # the engine or the folder failed otherwise
        raise ImageBuildError(f"building {tag} failed: {type(exc).__name__}: {_first_line(exc)}") from None


def _build(
    client: DockerClient, folder: Path, tag: str, base_image: str | None, labels: dict[str, str]
) -> BuiltAlgorithm:
    dockerfile = folder / "Dockerfile"
    if not dockerfile.is_file():
        raise BuildUsageError(f"{folder} holds no Dockerfile (make one with `vfed algorithm new NAME`)")
    args, base = _base_of(dockerfile, base_image)
    if base is not None and not _present(client, base):
        raise ImageBuildError(
            f"the base image {base} is not on this Docker engine: build it with `vnode image build` "
            "(offline: --wheelhouse DIR), load it (docker load), or give --base-image"
        )
    repository = tag.rpartition(":")[0]
    stage = f"{repository}:vfed-stage-{secrets.token_hex(4)}"
    click.echo(f"image {tag}: building {folder}" + (f" on {base}" if base else ""))
    try:
        build_one(client, folder, "Dockerfile", stage, args, {"vfed.built-by": BUILT_BY, **labels})
        manifest = _manifest(client, stage)
        sdk = _sdk(client, stage)
        image_id = relabel(
            client, stage, tag, {MANIFEST_LABEL: manifest.model_dump_json(), SDK_LABEL: sdk.to_label()}
        )
    finally:
        try:
            client.images.remove(stage)
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as exc:
            click.echo(f"vfed: the stage image {stage} could not be removed: {exc.explanation}", err=True)
    return BuiltAlgorithm(tag, image_id, manifest, sdk)
