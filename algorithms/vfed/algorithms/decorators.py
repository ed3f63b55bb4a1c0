"""Declaring what an algorithm offers: `@federated` runs at the data, `@central` orchestrates subtasks.

The declaration is data (a `FunctionSpec` attached to the function), so the wrapper can refuse undeclared
methods and the build can publish a manifest that the node reads before running the image.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, ParamSpec, TypeVar

from vfed.common.manifest import FunctionKind, FunctionSpec, Manifest

P = ParamSpec("P")
R = TypeVar("R")
SPEC_ATTRIBUTE = "__vfed_spec__"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_KWARG = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _attach(spec: FunctionSpec) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        setattr(function, SPEC_ATTRIBUTE, spec)
        return function

    return decorate


def federated(
    datasets: Iterable[str] = ("default",), *, epsilon_kwarg: str | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a function that runs at a node on its data.

    It receives one DataFrame per label in `datasets` (in that order) before its own arguments. Every one of
    them must hold at least the node's `min_rows` records. A differentially private function names the
    keyword argument holding the epsilon it spends (`epsilon_kwarg`), so the node can charge its budget.
    """
    labels = tuple(datasets)
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(f"invalid dataset label {label!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"dataset labels repeat: {labels}")
    if epsilon_kwarg is not None and not _KWARG.match(epsilon_kwarg):
        raise ValueError(f"invalid epsilon keyword argument name {epsilon_kwarg!r}")
    return _attach(FunctionSpec(kind=FunctionKind.FEDERATED, datasets=labels, epsilon_kwarg=epsilon_kwarg))


def central() -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Mark a function that orchestrates: it receives an `AlgorithmClient` before its own arguments."""
    return _attach(FunctionSpec(kind=FunctionKind.CENTRAL))


def spec_of(function: object) -> FunctionSpec | None:
    """The declaration attached by a decorator, or None for an undeclared function."""
    spec = getattr(function, SPEC_ATTRIBUTE, None)
    return spec if isinstance(spec, FunctionSpec) else None


def declared_functions(module: ModuleType) -> dict[str, tuple[Callable[..., Any], FunctionSpec]]:
    """Every declared function of a module by name: only these may be called by a task."""
    found: dict[str, tuple[Callable[..., Any], FunctionSpec]] = {}
    for name, value in vars(module).items():
        spec = spec_of(value)
        if spec is not None and callable(value) and not name.startswith("_"):
            found[name] = (value, spec)
    return found


def load_module(name: str) -> ModuleType:
    """Import the algorithm module named by the image (`VFED_ALGORITHM_MODULE`)."""
    return importlib.import_module(name)


def manifest_of(module: ModuleType) -> Manifest:
    """The manifest the build stores in the image label `vfed.manifest`."""
    return Manifest(functions={name: spec for name, (_, spec) in declared_functions(module).items()})
