"""The run's container created while its input is decrypted and its proxy starts; started after the checks.

Why: Docker's `create` (16-30 ms on the development machine) came after the agent's own setup (decrypt,
checks, proxy), in a row. Created ahead, it overlaps that setup, and the start path keeps only Docker's
`start`.

Nothing runs before every check passed: a created container runs no process. Still, only what the checks
that come later cannot change is created ahead:
- the image (by its ID) and the initiator pass the node's policies first, and every dataset the task names
  is offered here: a run these would refuse gets no container at all;
- a run reading a dataset with a privacy budget is not created ahead: its granted epsilon is part of the
  container's environment and is known only once the input is read.
The signed task descriptor (module `trust`) is checked before the start like everything else: a run it
refuses has its created container removed without it ever starting.
At start, the spec built from the checked run must equal the one created; any difference (or a failed
start) removes the early container, and the run starts the usual way. A refused run's early container is
removed with the rest of its setup; one a crash left behind carries the run's labels, so recovery removes it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vfed.node.policy import check_run
from vfed.node.runtime.base import NotFound, PermanentStartError, RunSpec, Runtime, RuntimeUnavailable

if TYPE_CHECKING:
    from vfed.common.api.resources import Task
    from vfed.node.config import NodeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ahead:
    """A container created for a run and not started."""

    handle: str
    spec: RunSpec


def may_create_ahead(settings: NodeSettings, runtime: Runtime, task: Task, digest: str) -> bool:
    """Whether a container may be made for this run before its input is read (see the module's docstring)."""
    if not runtime.creates_ahead:
        return False
    offered = settings.datasets
    if any(label not in offered or offered[label].epsilon_budget is not None for label in task.datasets):
        return False
    decision = check_run(
        settings,
        image=task.image,
        digest=digest,
        initiators=[(task.initiator_organization_id, task.initiator_user_id)],  # re-checked once verified
    )
    return decision.allowed


async def create(runtime: Runtime, spec: RunSpec) -> Ahead | None:
    """The created container, or None when the engine would not (the run then starts the usual way)."""
    try:
        return Ahead(await runtime.create(spec), spec)
    except (PermanentStartError, RuntimeUnavailable) as exc:
        log.info("run %s: no container ahead of the checks (%s)", spec.run_id, exc)
        return None


async def start(runtime: Runtime, ahead: Ahead, spec: RunSpec) -> str | None:
    """Start the early container when it was made for exactly this spec: its handle; else it is removed and
    the answer is None. PermanentStartError (a start the engine refuses) goes to the caller."""
    if ahead.spec == spec:
        try:
            await runtime.start_created(ahead.handle, spec)
            return ahead.handle
        except RuntimeUnavailable as exc:
            log.warning("run %s: the container made ahead did not start (%s)", spec.run_id, exc)
    else:
        log.warning("run %s: the checked run differs from its container made ahead; replaced", spec.run_id)
    await discard(runtime, ahead)
    return None


async def discard(runtime: Runtime, ahead: Ahead) -> None:
    with contextlib.suppress(NotFound, RuntimeUnavailable):
        await runtime.cleanup(ahead.handle)
