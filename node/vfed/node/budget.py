"""The privacy-budget step of a run: read the image's manifest and charge the node's budget store before
start; and the epsilon a run spends, which lease caps are held to."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import ValidationError

from vfed.common.manifest import MANIFEST_LABEL, EpsilonError, declared_epsilon
from vfed.common.payload import TaskInput
from vfed.node.config import NodeSettings
from vfed.node.privacy import BudgetRefused, BudgetStore, authorize, parse_manifest
from vfed.node.runtime.base import Runtime


async def image_labels(runtime: Runtime, image: str) -> dict[str, str]:
    """The image's labels. The runtime interface has no call for this yet, so Docker is asked directly."""
    own = getattr(runtime, "image_labels", None)
    if own is not None:
        labels: dict[str, str] = await own(image)
        return labels
    client: Any = getattr(runtime, "client", None)
    if client is None:
        raise BudgetRefused(f"the {runtime.name} runtime cannot show image labels, so no manifest is known")
    found = await asyncio.to_thread(lambda: client.images.get(image).labels or {})
    return {str(k): str(v) for k, v in found.items()}


def _task_input(plaintext: bytes) -> TaskInput:
    try:
        return TaskInput.from_json(plaintext)
    except ValidationError:
        raise BudgetRefused("the input is not a valid task input, so its privacy cost is unknown") from None


async def spent_epsilon(runtime: Runtime, *, image: str, plaintext: bytes) -> float | None:
    """The epsilon this run's method declares it spends (image manifest), or None when it declares none.
    BudgetRefused when the manifest or the input says something invalid."""
    task_input = _task_input(plaintext)
    manifest = parse_manifest((await image_labels(runtime, image)).get(MANIFEST_LABEL))
    spec = manifest.functions.get(task_input.method) if manifest is not None else None
    if spec is None or spec.epsilon_kwarg is None:
        return None
    try:
        return declared_epsilon(spec, task_input)
    except EpsilonError as exc:
        raise BudgetRefused(str(exc)) from exc


async def charge(
    settings: NodeSettings,
    store: BudgetStore,
    runtime: Runtime,
    *,
    run_key: str,
    image: str,
    plaintext: bytes,
    datasets: list[str],
    initiator: str,
) -> float | None:
    """The epsilon granted to this run (None when no dataset it reads has a budget); BudgetRefused if not."""
    budgets = {d: settings.datasets[d].epsilon_budget for d in datasets if d in settings.datasets}
    if not any(b is not None for b in budgets.values()):
        return None
    task_input = _task_input(plaintext)
    manifest = parse_manifest((await image_labels(runtime, image)).get(MANIFEST_LABEL))
    return await asyncio.to_thread(
        authorize,
        store,
        run_id=run_key,
        task_input=task_input,
        manifest=manifest,
        datasets=datasets,
        budgets=budgets,
        initiator=initiator,
    )
