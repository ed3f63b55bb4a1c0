"""What an algorithm image declares about its functions, read by the node before it runs anything.

The SDK builds it from the `@federated`/`@central` decorators (`python -m vfed.algorithms --manifest`) and the
example build script stores it in the image label `vfed.manifest`, so the declaration is bound to the image
digest the node's policy allows. The node uses it for the privacy budget: how much epsilon a run spends.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vfed.common.payload import TaskInput

MANIFEST_LABEL = "vfed.manifest"


class FunctionKind(StrEnum):
    """Federated functions run at the data; central ones orchestrate subtasks."""

    FEDERATED = "federated"
    CENTRAL = "central"


class FunctionSpec(BaseModel):
    """One callable method of an algorithm image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: FunctionKind
    datasets: tuple[str, ...] = ()
    epsilon_kwarg: str | None = None


class Manifest(BaseModel):
    """Every method an image offers, by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    functions: dict[str, FunctionSpec] = Field(default_factory=dict)


class EpsilonError(ValueError):
    """A differentially private method was called without a usable epsilon."""


def declared_epsilon(spec: FunctionSpec, task_input: TaskInput) -> float | None:
    """The epsilon a run of `spec` spends per dataset, or None for a method that does not spend budget."""
    if spec.epsilon_kwarg is None:
        return None
    raw: Any = task_input.kwargs.get(spec.epsilon_kwarg)
    if raw is None:
        raise EpsilonError(
            f"method {task_input.method!r} spends privacy budget: keyword argument "
            f"{spec.epsilon_kwarg!r} (epsilon) is required"
        )
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise EpsilonError(f"{spec.epsilon_kwarg!r} must be a number, got {type(raw).__name__}")
    epsilon = float(raw)
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise EpsilonError(f"{spec.epsilon_kwarg!r} must be a positive finite number, got {raw!r}")
    return epsilon
