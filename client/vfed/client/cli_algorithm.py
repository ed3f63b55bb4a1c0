"""`vfed algorithm new|build`: start an algorithm from the template, build its labelled image.

Usage errors (a bad NAME, tag, label or folder) print one line and exit 2; failures (the folder exists, no
Docker engine, a failed build) print one line and exit 1.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from vfed.client.algorithm_template import TemplateError, name_problem, new_project
from vfed.client.cli_common import fail

USAGE = 2


@click.group("algorithm")
def algorithm() -> None:
    """Write algorithms: a new one from the template, its image built with the labels nodes read."""


@algorithm.command("new")
@click.argument("name")
@click.option(
    "--dir",
    "parent",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="the folder to make NAME/ in",
)
def algorithm_new(name: str, parent: Path) -> None:
    """Make NAME/: the function module NAME.py, its test on local CSV datasets (test_NAME.py, data/), a
    Dockerfile and build.sh.

    \b
    Then:  cd NAME && python -m pytest && vfed algorithm build
    """
    problem = name_problem(name)
    if problem is not None:
        fail(f"NAME: {problem}", USAGE)
    try:
        target, files = new_project(name, parent)
    except TemplateError as exc:
        fail(str(exc))
        return
    click.echo(f"created {target}: {', '.join(files)}")
    if importlib.util.find_spec("pandas") is None:
        click.echo("note: its test needs the SDK's extras here: pip install 'vfed[algorithms]'")
    click.echo(f"next: cd {target} && python -m pytest && vfed algorithm build")


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--label: {pair!r} is not KEY=VALUE", USAGE)
        labels[key.strip()] = value
    return labels


@algorithm.command("build")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path), default=Path("."), required=False)
@click.option("--tag", help="the image name [default: FOLDER's name:latest]")
@click.option(
    "--base-image",
    help="the algorithm-base image the Dockerfile starts FROM (its ARG VFED_ALGORITHM_BASE) "
    "[default: vfed/algorithm-base]",
)
@click.option("--label", "pairs", multiple=True, metavar="KEY=VALUE", help="an extra label (repeatable)")
def algorithm_build(folder: Path, tag: str | None, base_image: str | None, pairs: tuple[str, ...]) -> None:
    """Build FOLDER/Dockerfile (default: the current folder) on the local Docker engine, labelled with the
    module's manifest (`vfed.manifest`) and the versions its SDK speaks (`vfed.sdk`), both read from the built
    image. Needs no network when the base image is present (`vnode image build` makes it).

    \b
    Example: vfed algorithm build my_stats --tag registry.example.org/my_stats:1.0
    """
    # docker and the builder load only here: the other vfed commands do not need them
    from vfed.client.algorithm_build import BuildUsageError, build_algorithm
    from vfed.common.image_build import ImageBuildError, engine, valid_reference

    if not folder.is_dir():
        fail(f"FOLDER: {folder} is not a folder", USAGE)
    name = tag or f"{folder.resolve().name.lower()}:latest"
    if not valid_reference(name):
        where = "--tag" if tag else "FOLDER (its name is the default tag; give --tag)"
        fail(f"{where}: {name!r} is not a valid image name (lower-case, NAME:TAG)", USAGE)
    labels = _labels(pairs)
    try:
        built = build_algorithm(engine(), folder, name, base_image, labels)
    except BuildUsageError as exc:
        fail(str(exc), USAGE)
        return
    except ImageBuildError as exc:
        fail(str(exc))
        return
    methods = ", ".join(f"{n} ({spec.kind.value})" for n, spec in sorted(built.manifest.functions.items()))
    click.echo(f"built {built.tag} ({built.image_id[:19]}): {methods}; vfed {built.sdk.version}")
