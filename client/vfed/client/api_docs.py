"""The Python client's API reference (docs/client-api.md), generated from the code it documents.

    python -m vfed.client.api_docs --write docs/client-api.md    # regenerate
    python -m vfed.client.api_docs --check docs/client-api.md    # exit 1 when the file is out of date

Every name `vfed.client` exports, with the signature and docstring of each public method and property.
`Client`'s methods block and take the arguments of `AsyncClient`'s coroutines of the same name; where a
`Client` method has no docstring of its own, the reference gives `AsyncClient`'s. A public method with no
docstring on either is an error, so the reference cannot silently lose a method's description.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import vfed.client

HEADER = """# The Python client: API reference

Generated from the code by `python -m vfed.client.api_docs --write docs/client-api.md` (a test checks that
it is current); do not edit by hand. How to use the client, from login to a DataFrame:
[researchers.md](researchers.md) and the notebook [researchers.ipynb](researchers.ipynb).
"""


class Undocumented(Exception):
    """Public members without a docstring."""


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public methods and properties defined by the class itself, in source order."""
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, (staticmethod, classmethod)):
            yield name, member.__func__
        elif isinstance(member, property) or inspect.isfunction(member):
            yield name, member


def _annotation(annotation: Any) -> str:
    """As written in the source (annotations are strings under `from __future__ import annotations`)."""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))


def _parameters(signature: inspect.Signature) -> str:
    shown: list[str] = []
    star_done = False
    for p in signature.parameters.values():
        if p.name in ("self", "cls") or p.name.startswith("_"):
            continue
        if p.kind is p.KEYWORD_ONLY and not star_done:
            shown.append("*")
        star_done = star_done or p.kind in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)
        stars = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        text = stars + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        shown.append(text)
    return ", ".join(shown)


def _signature(owner: str, name: str, member: Any) -> str:
    if isinstance(member, property):
        returns = inspect.signature(member.fget).return_annotation if member.fget else inspect.Signature.empty
        kind = "property"
        return f"{kind} {owner}.{name}" + (
            "" if returns is inspect.Signature.empty else f": {_annotation(returns)}"
        )
    signature = inspect.signature(member)
    prefix = "async " if inspect.iscoroutinefunction(member) else ""
    returns = signature.return_annotation
    tail = "" if returns is inspect.Signature.empty else f" -> {_annotation(returns)}"
    return f"{prefix}{owner}.{name}({_parameters(signature)}){tail}"


def _type(annotation: Any) -> str:
    """A field's type as one would write it (`list[int]`, `datetime | None`)."""
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "").replace("datetime.datetime", "datetime")
    return text.replace("NoneType", "None")


def _fields(model: type[BaseModel]) -> str:
    """A model's fields, each with its type and, where it has one, its description."""
    lines = ["Fields:\n"]
    for name, info in model.model_fields.items():
        kind = _type(info.annotation)
        text = f"- `{name}: {kind}`"
        lines.append(text + (f": {info.description}" if info.description else ""))
    return "\n".join(lines) + "\n"


def _doc(member: Any) -> str | None:
    target: Callable[..., Any] | None = member.fget if isinstance(member, property) else member
    return inspect.getdoc(target) if target is not None else None


def _fallback(cls: type) -> type | None:
    return vfed.client.AsyncClient if cls is vfed.client.Client else None


def render() -> str:
    """The reference as Markdown; Undocumented names every public member without a docstring."""
    out = [HEADER]
    missing: list[str] = []
    for export in vfed.client.__all__:
        obj = getattr(vfed.client, export)
        out.append(f"## `{export}`\n")
        out.append((inspect.getdoc(obj) or "").strip() + "\n")
        if not isinstance(obj, type) or issubclass(obj, BaseException):
            continue
        if issubclass(obj, BaseModel):
            out.append(_fields(obj))
        for name, member in _members(obj):
            doc = _doc(member)
            other = _fallback(obj)
            if not doc and other is not None and name in vars(other):
                doc = _doc(vars(other)[name])
            if not doc:
                missing.append(f"{export}.{name}")
                continue
            out.append(f"### `{_signature(export, name, member)}`\n")
            out.append(doc.strip() + "\n")
    if missing:
        raise Undocumented("no docstring: " + ", ".join(missing))
    return "\n".join(out).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vfed.client.api_docs", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="PATH", help="write the reference to PATH")
    group.add_argument(
        "--check", metavar="PATH", help="exit 1 when PATH differs from the generated reference"
    )
    options = parser.parse_args(argv)
    try:
        text = render()
    except Undocumented as exc:
        print(f"vfed.client.api_docs: {exc}", file=sys.stderr)
        return 1
    if options.write:
        Path(options.write).write_text(text)
        return 0
    current = Path(options.check).read_text() if Path(options.check).exists() else ""
    if current != text:
        print(f"{options.check} is out of date: run python -m vfed.client.api_docs --write {options.check}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
