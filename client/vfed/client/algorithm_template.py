"""`vfed algorithm new NAME`: a new algorithm's folder from the template shipped in the package
(algorithm_template/): the function module, its test on local CSV datasets, a Dockerfile, a build script."""

from __future__ import annotations

import importlib.util
import keyword
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

PLACEHOLDER = "{{name}}"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,49}$")


class TemplateError(Exception):
    """The folder cannot be made (it exists, or cannot be written)."""


def name_problem(name: str) -> str | None:
    """Why NAME cannot name an algorithm (it is the module, the folder and the image name), or None."""
    if not _NAME.match(name):
        return "use lower-case letters, digits and _, starting with a letter (at most 50)"
    if keyword.iskeyword(name) or name in sys.stdlib_module_names:
        return f"{name!r} is a Python keyword or standard-library module; the image could not import it"
    if name in ("vfed", "test") or importlib.util.find_spec(name) is not None:
        return f"{name!r} is already a Python package here; the module would shadow it"
    return None


def _files(name: str) -> dict[str, str]:
    """Target path (relative) -> template path (inside the package)."""
    return {
        "Dockerfile": "Dockerfile.tmpl",
        f"{name}.py": "module.py.tmpl",
        f"test_{name}.py": "test_module.py.tmpl",
        "build.sh": "build.sh.tmpl",
        "README.md": "README.md.tmpl",
        "data/org1.csv": "data/org1.csv",
        "data/org2.csv": "data/org2.csv",
    }


def new_project(name: str, parent: Path) -> tuple[Path, list[str]]:
    """Write the folder parent/NAME; its path and the files written. Nothing is left on failure."""
    target = parent / name
    if target.exists():
        raise TemplateError(f"{target} already exists; choose another name or --dir")
    if not parent.is_dir():
        raise TemplateError(f"{parent} is not a folder")
    template = resources.files("vfed.client") / "algorithm_template"
    files = _files(name)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    except OSError as exc:
        raise TemplateError(f"cannot write in {parent}: {exc.strerror or exc}") from None
    try:
        for relative, source in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(template.joinpath(source).read_text().replace(PLACEHOLDER, name))
        (staging / "build.sh").chmod(0o755)
        staging.chmod(0o755)
        staging.rename(target)  # all files or none: a half-written folder never has the name
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise TemplateError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target, sorted(files)
