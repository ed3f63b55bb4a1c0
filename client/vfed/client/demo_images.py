"""The demo's algorithm image: the one `make images` built, or one made from this installed vfed.

In order: the image `--image` names (it must be on the engine), else vfed-examples/summary_stats:latest
(`make images`), else vfed-demo/summary_stats:<version> (an earlier `vfed demo`), else that one is built:
the example module and its Dockerfile travel in the wheel (pyproject.toml force-includes
algorithms/examples/summary_stats as vfed/client/demo_context/), on top of an
algorithm-base image: vfed/algorithm-base:latest when present, else vfed-demo/algorithm-base:<version>,
built by `vnode image build` on a Python base image that is present or can be pulled. Without root no Debian
base is bootstrapped: the demo then says what to do and stops. Like algorithms/examples/build.sh, the image
carries the SDK's manifest of its module (label vfed.manifest), read from the image itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfed.client.algorithm_build import build_algorithm
from vfed.client.demo_session import DemoError
from vfed.common.image_build import ImageBuildError

EXAMPLE = "summary_stats"
MADE_BY_MAKE = f"vfed-examples/{EXAMPLE}:latest"
ALGORITHM_BASE = "vfed/algorithm-base:latest"
OWN_PREFIX = "vfed-demo/"
DEFAULT_BASE = "python:3.11-slim"
OFFLINE_BASE = "vfed/debian-python:bookworm"  # what `make images` / `vnode image build` bootstrap as root
CONTEXT_FILES = ("Dockerfile", f"{EXAMPLE}.py")
LOG_TAIL = 20

Say = Callable[[str], None]


def version() -> str:
    try:
        return importlib.metadata.version("vfed")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


def own_names(tag: str) -> tuple[str, str]:
    """The demo's own algorithm-base and example image names."""
    return f"{OWN_PREFIX}algorithm-base:{tag}", f"{OWN_PREFIX}{EXAMPLE}:{tag}"


def example_context() -> Path:
    """The example's Dockerfile and module: shipped in the installed package, or a checkout's example."""
    here = Path(__file__).resolve().parent
    for folder in (here / "demo_context", here.parents[2] / "algorithms" / "examples" / EXAMPLE):
        if all((folder / name).is_file() for name in CONTEXT_FILES):
            return folder
    raise DemoError(f"the demo's example algorithm is not installed with vfed ({here}): reinstall vfed")


def _present(engine: Any, image: str) -> bool:
    import docker.errors

    try:
        engine.images.get(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def _pulled(engine: Any, image: str) -> bool:
    import docker.errors

    try:
        engine.images.pull(image)
    except (docker.errors.DockerException, OSError):
        return False
    return True


def python_base(
    engine: Any, asked: str | None, is_root: bool, defaults: tuple[str, str] = (DEFAULT_BASE, OFFLINE_BASE)
) -> str | None:
    """The base `vnode image build` should use (None: let it bootstrap Debian, as root); DemoError when
    there is none and this user cannot make one. `defaults`: the registry's base, the bootstrapped one."""
    hint = (
        "run `make images` as root in a vfed checkout, or `vnode image build --base-image IMAGE` with a "
        "Python 3.11 image you loaded (docker load), then `vfed demo` again"
    )
    if asked:
        if _present(engine, asked) or _pulled(engine, asked):
            return asked
        raise DemoError(f"the base image {asked} (BASE_IMAGE) is not present and cannot be pulled: {hint}")
    registry_base, _ = defaults
    for name in defaults:
        if _present(engine, name):
            return name
    if _pulled(engine, registry_base):
        return registry_base
    if is_root:
        return None
    raise DemoError(
        f"no algorithm image ({MADE_BY_MAKE}) and no Python base image: {registry_base} cannot be pulled, "
        f"and building one from Debian with debootstrap needs root; {hint}"
    )


def build_algorithm_base(
    say: Say, vnode: str, env: dict[str, str], tag: str, base: str | None, wheelhouse: Path | None
) -> str:
    """vfed-demo/algorithm-base:TAG (with -base and -node) by `vnode image build` from this installation."""
    cmd = [vnode, "image", "build", "--prefix", OWN_PREFIX, "--tag", tag]
    if base is not None:
        cmd += ["--base-image", base]
    if wheelhouse is not None:
        cmd += ["--wheelhouse", str(wheelhouse)]
    say(f"building the algorithm base image with `{' '.join(cmd[1:])}` (a few minutes, once)")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        raise DemoError(f"`vnode image build` failed: {lines[-1]}")
    return f"{OWN_PREFIX}algorithm-base:{tag}"


def build_example(engine: Any, base: str, image: str) -> str:
    """The example image on `base`, labelled as `vfed algorithm build` labels every algorithm image (the
    manifest and the SDK versions, read from the image itself)."""
    source = example_context()
    with tempfile.TemporaryDirectory(prefix="vfed-demo-image-") as tmp:
        for name in CONTEXT_FILES:
            shutil.copy2(source / name, Path(tmp) / name)
        try:
            build_algorithm(engine, Path(tmp), image, base_image=base)
        except ImageBuildError as exc:
            raise DemoError(f"building {image} failed: {exc}") from None
    return image


@dataclass(frozen=True)
class Choice:
    """What the user said about images (`vfed demo --image/--base-image/--wheelhouse`)."""

    image: str | None = None
    """The algorithm image to run, instead of finding or building one; it must be on the engine."""
    base_image: str | None = None
    """The Python base to build an algorithm-base image on (else $BASE_IMAGE, else found or pulled)."""
    wheelhouse: Path | None = None
    """Wheels for `vnode image build`, without a package index."""


def algorithm_image(say: Say, vnode: str, env: dict[str, str], choice: Choice) -> str:
    """The image the demo runs: given, found, or built (see the module's docstring)."""
    import docker
    import docker.errors

    try:
        engine = docker.from_env(timeout=600)
        engine.ping()
    except docker.errors.DockerException as exc:
        raise DemoError(
            f"no Docker engine answers ({exc.__class__.__name__}); start one, and make sure you may use it "
            "(the `docker` group)"
        ) from None
    tag = version()
    own_base, own_example = own_names(tag)
    try:
        if choice.image is not None:
            if not _present(engine, choice.image):
                raise DemoError(f"the image {choice.image} (--image) is not on this Docker engine")
            say(f"algorithm image {choice.image} (--image)")
            return choice.image
        for image in (MADE_BY_MAKE, own_example):
            if _present(engine, image):
                say(f"algorithm image {image} (present)")
                return image
        base = next((b for b in (ALGORITHM_BASE, own_base) if _present(engine, b)), None)
        if base is None:
            asked = choice.base_image or os.environ.get("BASE_IMAGE")
            python = python_base(engine, asked, os.geteuid() == 0)
            base = build_algorithm_base(say, vnode, env, tag, python, choice.wheelhouse)
        say(f"algorithm image {own_example}: building on {base}")
        return build_example(engine, base, own_example)
    finally:
        engine.close()
