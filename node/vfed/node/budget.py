"""The privacy-budget step of a run: read the image's manifest and charge the node's budget store before
start; and the epsilon a run spends, which lease caps are held to."""

from __future__ import annotations

import asyncio
import logging

from vfed.common.manifest import MANIFEST_LABEL, EpsilonError, declared_epsilon
from vfed.common.payload import TaskInput
from vfed.node.config import NodeSettings
from vfed.node.privacy import BudgetRefused, BudgetStore, authorize, parse_manifest
from vfed.node.run_input import RunInput
from vfed.node.runtime.base import Runtime, VfedRuntimeError

log = logging.getLogger(__name__)


async def image_labels(runtime: Runtime, image: str) -> dict[str, str]:
    """The image's labels, where its manifest is; BudgetRefused when the runtime cannot tell them (the
    engine's words stay in the node's log: they may name the node's paths)."""
    try:
        return await runtime.image_labels(image)
    except VfedRuntimeError as exc:
        log.warning("the labels of image %s are unknown: %s", image, exc)
        raise BudgetRefused("the image's labels cannot be read, so its manifest is unknown") from None


async def _task_input(run_input: RunInput) -> TaskInput:
    """The input's method and keyword arguments (a big input's read from its file: vfed.node.run_input)."""
    try:
        return await run_input.header()
    except ValueError:  # pydantic's ValidationError, or input_header's InputFormatError
        raise BudgetRefused("the input is not a valid task input, so its privacy cost is unknown") from None


async def spent_epsilon(runtime: Runtime, *, image: str, run_input: RunInput) -> float | None:
    """The epsilon this run's method declares it spends (image manifest), or None when it declares none.
    BudgetRefused when the manifest or the input says something invalid."""
    task_input = await _task_input(run_input)
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
    run_input: RunInput,
    datasets: list[str],
    initiator: str,
) -> float | None:
    """The epsilon granted to this run (None when no dataset it reads has a budget); BudgetRefused if not."""
    budgets = {d: settings.datasets[d].epsilon_budget for d in datasets if d in settings.datasets}
    if not any(b is not None for b in budgets.values()):
        return None
    task_input = await _task_input(run_input)
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
