"""The image builder behind `vnode image build` (the node and algorithm-base images from an installed vfed,
no checkout) and `vfed algorithm build` (an algorithm image on top of the algorithm-base).

The Dockerfiles travel inside the wheel (pyproject.toml force-includes docker/{base,node,algorithm-base}
.Dockerfile as vfed/common/image_context/); in a source checkout (an editable install) they are read from
docker/. The build context is made in a temporary folder: those Dockerfiles plus `wheels/`, every wheel the
images install from (`pip install --no-index`), so the images build without a package index:
- the project wheel: the wheelhouse's vfed wheel when `--wheelhouse` holds one, else made from the installed
  package itself (its files as its RECORD lists them, repacked into a wheel; from an editable install, built
  from its source folder with `pip wheel`);
- the dependencies: the wheels of `--wheelhouse` (e.g. build/wheelhouse of `make images`, copied to an
  air-gapped site), else `pip wheel` from the package index pip is configured with.
The Python base is `--base-image`/`BASE_IMAGE`; without one, python:3.11-slim when present or pullable, else
the offline builder: a Debian bookworm root file system from `debootstrap --variant=minbase` with python3 and
python3-venv, imported as vfed/debian-python:bookworm (made once, reused after), as build-images.sh does.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import docker.errors
from docker import DockerClient

import vfed.common

CONTEXT_DIR = "image_context"  # inside the installed vfed.common package (pyproject.toml force-include)
DOCKERFILES = ("base.Dockerfile", "node.Dockerfile", "algorithm-base.Dockerfile")
DEFAULT_BASE = "python:3.11-slim"
OFFLINE_BASE = "vfed/debian-python:bookworm"
DEBOOTSTRAP_PACKAGES = "python3,python3-venv,ca-certificates"
# what the algorithm-base (algorithms,postgres) and node (sql) images install
EXTRAS = "algorithms,postgres,sql"
BUILD_TIMEOUT_S = 1800  # a silent `pip install -q` of pandas/pyarrow may take minutes
LOG_TAIL = 20
# The installer's own files in a dist-info folder: not part of the wheel it came from.
INSTALLER_FILES = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


class ImageBuildError(Exception):
    """A build that cannot go on; the message is one line saying what to do."""


class WheelhouseError(ImageBuildError):
    """The wheelhouse given holds nothing to install from (a usage error)."""


def dockerfiles_dir() -> Path:
    """Where the image Dockerfiles are: shipped in the installed package, or a checkout's docker/."""
    shipped = Path(vfed.common.__file__).resolve().parent / CONTEXT_DIR
    if all((shipped / name).is_file() for name in DOCKERFILES):
        return shipped
    checkout = Path(__file__).resolve().parents[3] / "docker"
    if all((checkout / name).is_file() for name in DOCKERFILES):
        return checkout
    raise ImageBuildError(
        f"the image Dockerfiles are not installed with vfed (looked in {shipped} and {checkout}): "
        "reinstall vfed from its wheel"
    )


# --- the project wheel --------------------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def _editable_source(dist: importlib.metadata.Distribution) -> Path | None:
    """The source folder of an editable install (PEP 610 direct_url.json), else None."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    url = str(info.get("url", ""))
    if info.get("dir_info", {}).get("editable") and url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return None


def _wheel_tag(dist: importlib.metadata.Distribution) -> str:
    """The first `Tag:` of the installed WHEEL file (py3-none-any for vfed's pure-Python wheel)."""
    for line in (dist.read_text("WHEEL") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Tag" and value.strip():
            return value.strip()
    return "py3-none-any"


def repack_installed(dist: importlib.metadata.Distribution, out: Path) -> Path:
    """The installed distribution's files (as its RECORD lists them) as a wheel again, in out/."""
    files = [f for f in dist.files or [] if f.parts and f.parts[0] != ".."]  # scripts: pip remakes them
    infos = {f.parts[0] for f in files if f.parts[0].endswith(".dist-info")}
    if len(infos) != 1:
        raise ImageBuildError(f"the installed vfed {dist.version} lists no single .dist-info folder")
    [info] = infos
    name = dist.metadata["Name"]
    wheel = out / f"{name}-{dist.version}-{_wheel_tag(dist)}.whl"
    records: list[str] = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(files, key=str):
            if "__pycache__" in file.parts or file.suffix == ".pyc":
                continue
            if file.parts[0] == info and file.name in INSTALLER_FILES:
                continue
            path = Path(str(file.locate()))
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ImageBuildError(
                    f"the installed vfed is incomplete ({path}: {exc.strerror}); reinstall it"
                ) from None
            zf.writestr(file.as_posix(), data)
            records.append(f"{file.as_posix()},{_record_hash(data)},{len(data)}")
        records.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(records) + "\n")
    return wheel


def project_wheel(out: Path) -> tuple[Path, str]:
    """The wheel of the vfed this command runs from, in out/, and how it was made (for the operator)."""
    try:
        dist = importlib.metadata.distribution("vfed")
    except importlib.metadata.PackageNotFoundError:
        raise ImageBuildError("vfed is not installed as a package here (pip install vfed)") from None
    source = _editable_source(dist)
    if source is None:
        wheel = repack_installed(dist, out)
        return wheel, f"made from the installed vfed {dist.version} ({dist.locate_file('')})"
    before = set(out.glob("vfed-*.whl"))
    _run_pip(["wheel", "-q", "--no-deps", "-w", str(out), str(source)], "building the vfed wheel")
    made = sorted(set(out.glob("vfed-*.whl")) - before)
    if not made:
        raise ImageBuildError(f"pip wheel made no vfed wheel from {source}")
    return made[-1], f"built from the editable install's source {source}"


def _run_pip(args: list[str], what: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        for line in (done.stdout + done.stderr).splitlines()[-LOG_TAIL:]:
            click.echo(f"    {line}", err=True)
        raise ImageBuildError(f"{what} failed: pip {' '.join(args)}")


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link when possible (same file system), else a copy; a symbolic link's target, not the link."""
    source = source.resolve()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def gather_wheels(wheels: Path, wheelhouse: Path | None) -> list[str]:
    """wheels/ of the build context: the project wheel and its dependencies; lines saying where from."""
    wheels.mkdir()
    if wheelhouse is None:
        wheel, how = project_wheel(wheels)
        _run_pip(
            ["wheel", "-q", "-w", str(wheels), f"{wheel}[{EXTRAS}]"],
            "fetching the dependency wheels (give --wheelhouse where no package index answers)",
        )
        count = len(list(wheels.glob("*.whl")))
        return [f"project wheel: {wheel.name}, {how}", f"wheels: {count}, from pip's package index"]
    found = sorted(wheelhouse.glob("*.whl"))
    if not found:
        raise WheelhouseError(f"{wheelhouse} holds no wheels (*.whl)")
    for wheel in found:
        _link_or_copy(wheel, wheels / wheel.name)
    ours = [w.name for w in found if w.name.startswith("vfed-")]
    if ours:
        line = f"project wheel: {', '.join(ours)}, taken from {wheelhouse}"
    else:
        wheel, how = project_wheel(wheels)
        line = f"project wheel: {wheel.name}, {how}"
    return [line, f"wheels: {len(found)} from {wheelhouse}"]


# --- the base image -----------------------------------------------------------------------------------------


def _present(client: DockerClient, image: str) -> bool:
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def _pulled(client: DockerClient, image: str) -> bool:
    try:
        client.images.pull(image)
    except (docker.errors.DockerException, OSError):
        return False
    return True


def resolve_base(client: DockerClient, base: str | None) -> str:
    """The Python base image: the one asked for (present or pulled), else the default, else built offline."""
    if base:
        if _present(client, base):
            click.echo(f"base image: {base} (present)")
            return base
        if _pulled(client, base):
            click.echo(f"base image: {base} (pulled)")
            return base
        raise ImageBuildError(
            f"base image {base} is not present and cannot be pulled: load it (docker load), or leave out "
            "--base-image/BASE_IMAGE to build one from Debian with debootstrap"
        )
    if _present(client, DEFAULT_BASE) or _pulled(client, DEFAULT_BASE):
        click.echo(f"base image: {DEFAULT_BASE}")
        return DEFAULT_BASE
    return offline_base(client)


def offline_base(client: DockerClient) -> str:
    """vfed/debian-python:bookworm, made with debootstrap when missing (no image registry needed)."""
    if _present(client, OFFLINE_BASE):
        click.echo(f"base image: {OFFLINE_BASE} (built earlier with debootstrap)")
        return OFFLINE_BASE
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ImageBuildError(
            f"no registry answers for {DEFAULT_BASE} and debootstrap is not installed: "
            "apt-get install debootstrap, or give --base-image"
        )
    if os.geteuid() != 0:
        raise ImageBuildError("building the base image with debootstrap needs root (or give --base-image)")
    click.echo(f"base image: building {OFFLINE_BASE} from Debian with debootstrap (about a minute)")
    with tempfile.TemporaryDirectory(prefix="vfed-rootfs-") as tmp:
        root = Path(tmp) / "root"
        _run_logged(
            [debootstrap, "--variant=minbase", f"--include={DEBOOTSTRAP_PACKAGES}", "bookworm", str(root)],
            "debootstrap",
        )
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (root / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        archive = Path(tmp) / "root.tar"
        _run_logged(["tar", "-C", str(root), "-cf", str(archive), "."], "tar")
        repository, _, tag = OFFLINE_BASE.rpartition(":")
        try:
            client.api.import_image_from_file(
                str(archive), repository=repository, tag=tag, changes=["ENV LANG=C.UTF-8", 'CMD ["python3"]']
            )
        except docker.errors.APIError as exc:
            raise ImageBuildError(f"docker import of the Debian root failed: {exc.explanation}") from None
    return OFFLINE_BASE


def _run_logged(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        for line in (done.stdout + done.stderr).splitlines()[-LOG_TAIL:]:
            click.echo(f"    {line}", err=True)
        raise ImageBuildError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}")


# --- the images ---------------------------------------------------------------------------------------------


def _log_lines(chunks: Iterable[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for chunk in chunks:
        text = str(chunk.get("stream") or chunk.get("error") or "")
        lines += [line for line in text.splitlines() if line.strip()]
    return lines


def build_one(
    client: DockerClient,
    context: Path,
    dockerfile: str,
    tag: str,
    args: dict[str, str],
    labels: dict[str, str] | None = None,
) -> str:
    """One `docker build` of the context; the image id. A failure prints the log's tail, then one line."""
    try:
        image, _ = client.images.build(
            path=str(context),
            dockerfile=dockerfile,
            tag=tag,
            buildargs=args,
            labels=labels if labels is not None else {"vfed.built-by": "vnode image build"},
            rm=True,
            forcerm=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except docker.errors.BuildError as exc:
        for line in _log_lines(exc.build_log)[-LOG_TAIL:]:
            click.echo(f"    {line}", err=True)
        raise ImageBuildError(f"building {tag} failed: {exc.msg}") from None
    except docker.errors.APIError as exc:
        raise ImageBuildError(f"building {tag} failed: {exc.explanation}") from None
    return str(image.id)


def relabel(client: DockerClient, image: str, tag: str, labels: dict[str, str]) -> str:
    """`image` again under `tag` with `labels` added (a build of `FROM image`, nothing else); the new ID."""
    with tempfile.TemporaryDirectory(prefix="vfed-label-") as tmp:
        (Path(tmp) / "Dockerfile").write_text(f"FROM {image}\n")
        return build_one(client, Path(tmp), "Dockerfile", tag, {}, labels)


def image_names(prefix: str, tag: str) -> dict[str, str]:
    """The three images' names: PREFIX + base|node|algorithm-base, each with :TAG."""
    return {kind: f"{prefix}{kind}:{tag}" for kind in ("base", "node", "algorithm-base")}


def build_images(
    client: DockerClient, base_image: str | None, wheelhouse: Path | None, prefix: str, tag: str
) -> dict[str, str]:
    """What `vnode image build` does; the names of the images it built."""
    sources = dockerfiles_dir()
    names = image_names(prefix, tag)
    base = resolve_base(client, base_image)
    with tempfile.TemporaryDirectory(prefix="vfed-image-") as tmp:
        context = Path(tmp)
        for name in DOCKERFILES:
            shutil.copy2(sources / name, context / name)
        for line in gather_wheels(context / "wheels", wheelhouse):
            click.echo(line)
        steps = [
            ("base", "base.Dockerfile", {"BASE_IMAGE": base}),
            ("node", "node.Dockerfile", {"VFED_BASE": names["base"]}),
            ("algorithm-base", "algorithm-base.Dockerfile", {"VFED_BASE": names["base"]}),
        ]
        for kind, dockerfile, args in steps:
            click.echo(f"image {names[kind]}: building")
            image_id = build_one(client, context, dockerfile, names[kind], args)
            click.echo(f"image {names[kind]}: built ({image_id[:19]})")
    return names


def valid_reference(name: str) -> bool:
    """A docker image reference as `docker build -t` takes it: lower-case repository path, a tag."""
    repository, _, tag = name.rpartition(":")
    if "/" in tag or not repository:  # a registry port, not a tag
        return False
    allowed_repo = set("abcdefghijklmnopqrstuvwxyz0123456789._-/:")
    allowed_tag = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    return (
        bool(tag)
        and len(tag) <= 128
        and set(tag) <= allowed_tag
        and set(repository) <= allowed_repo
        and not repository.startswith(("/", "-", "."))
        and "//" not in repository
    )


def engine() -> DockerClient:
    """A connected Docker client; ImageBuildError (one line) when no engine answers."""
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        first = str(exc).strip().splitlines()
        raise ImageBuildError(
            f"Docker engine not running or not reachable: {first[0] if first else type(exc).__name__}"
        ) from None
    return client
