"""The test images in tests/images/<name>/: built once, labelled with a hash of their inputs, reused after.

`make images` calls this (`python -m tests.imagebuild`) and so do the tests that need an image, so both agree
on when an image is current and a second `make test` reuses them.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"
LABEL = "vfed.inputs"


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, timeout=900).stdout


def _base_id(folder: Path) -> str:
    for line in (folder / "Dockerfile").read_text().splitlines():
        if line.strip().upper().startswith("FROM "):
            return _docker("image", "inspect", "--format", "{{.Id}}", line.split()[1]).strip()
    return ""


def inputs_hash(folder: Path, labels: dict[str, str]) -> str:
    digest = hashlib.sha256(_base_id(folder).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    for key, value in sorted(labels.items()):
        digest.update(f"{key}={value}".encode())
    return digest.hexdigest()[:16]


def ensure(name: str, tag: str | None = None, labels: dict[str, str] | None = None) -> str:
    """Build vfed-test/<name> (or `tag`) unless its inputs are unchanged; answers 'reused' or 'built'."""
    folder, tag, labels = IMAGES / name, tag or f"vfed-test/{name}", labels or {}
    wanted = inputs_hash(folder, labels)
    try:
        current = _docker(
            "image", "inspect", "--format", f'{{{{ index .Config.Labels "{LABEL}" }}}}', tag
        ).strip()
    except subprocess.CalledProcessError:
        current = ""
    if current == wanted:
        return "reused"
    extra = [arg for key, value in {**labels, LABEL: wanted}.items() for arg in ("--label", f"{key}={value}")]
    _docker("build", "-q", "-t", tag, *extra, str(folder))
    return "built"


def main() -> int:
    for folder in sorted(p for p in IMAGES.iterdir() if (p / "Dockerfile").exists()):
        outcome = ensure(folder.name)
        word = "reused (inputs unchanged)" if outcome == "reused" else "built"
        print(f"[vfed] image vfed-test/{folder.name}: {word}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
