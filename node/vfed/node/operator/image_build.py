"""`vnode image build`: the node image and the algorithm-base image from an installed vfed, no checkout.
The builder itself is vfed.common.image_build (shared with `vfed algorithm build`)."""

from __future__ import annotations

from pathlib import Path

import click

from vfed.common.image_build import (
    ImageBuildError,
    WheelhouseError,
    build_images,
    image_names,
    valid_reference,
)
from vfed.node.operator.common import CONTEXT, BadInput, OperatorError, engine

_HELP = """Build the node image and the algorithm-base image from this installed vfed (no checkout needed).

\b
The images are PREFIX + base, node and algorithm-base, tagged TAG (default: vfed/base, vfed/node,
vfed/algorithm-base, :latest): `vnode start` runs vfed/node. They install only from the wheels gathered for
the build (pip --no-index): the project wheel (from --wheelhouse, else made from the installed package) and
its dependencies (from --wheelhouse, else fetched by pip from its package index).
The Python base: --base-image or $BASE_IMAGE; without one, python:3.11-slim when present or pullable, else
vfed/debian-python:bookworm built with debootstrap (root, the debootstrap package and a Debian mirror).
The wheels must suit the base's Python (cp311 wheels for Debian bookworm and python:3.11-slim).

\b
Examples:
  vnode image build
  vnode image build --wheelhouse /media/usb/wheelhouse --base-image python:3.11-slim
  vnode image build --prefix registry.example.org/vfed/ --tag 0.1.0
"""


@click.group("image", context_settings=CONTEXT)
def image_group() -> None:
    """The vfed container images: build them from this installation."""


@image_group.command("build", help=_HELP, context_settings=CONTEXT)
@click.option(
    "--base-image",
    envvar="BASE_IMAGE",
    help="The Python base image [$BASE_IMAGE; default: python:3.11-slim, else built with debootstrap].",
)
@click.option(
    "--wheelhouse",
    type=click.Path(path_type=Path),
    help="A folder of wheels to install from (e.g. build/wheelhouse of `make images`); default: pip fetches.",
)
@click.option("--prefix", default="vfed/", show_default=True, help="Image name prefix.")
@click.option("--tag", default="latest", show_default=True, help="Image tag.")
def build_command(base_image: str | None, wheelhouse: Path | None, prefix: str, tag: str) -> None:
    if wheelhouse is not None and not wheelhouse.is_dir():
        raise BadInput("--wheelhouse", f"{wheelhouse} is not a folder")
    for kind, name in image_names(prefix, tag).items():
        if not valid_reference(name):
            raise BadInput("--prefix/--tag", f"{name!r} (the {kind} image) is not a valid image name")
    try:
        names = build_images(engine(), base_image or None, wheelhouse, prefix, tag)
    except WheelhouseError as exc:
        raise BadInput("--wheelhouse", str(exc)) from None
    except ImageBuildError as exc:
        raise OperatorError(str(exc)) from None
    click.echo(f"built {', '.join(names.values())}")
