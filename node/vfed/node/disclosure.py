"""Disclosure control the node applies to a run's output before any byte of it is sealed.

The rules of a run are fixed when it is accepted (`rules_for`: the node's limits, the strictest of the
datasets it reads, the image rule's `unchecked_outputs`, the epsilon charged) and kept in the journal, so a
run collected after a restart is judged by the same rules. `judge` then reads the stopped run's output:

- a run that read no dataset of this node (a central function combining released subtask results) has
  nothing of this node's data to disclose: its output is not checked;
- a structured output (vfed.common.disclosure) is decoded, at most `max_structured_output_bytes` of it,
  and refused when a part breaks a rule;
- any other output (plain JSON, Parquet, a structured one over the size limit) is unchecked: refused unless
  the image's policy allows unchecked outputs.

What leaves the node is `disclosure-refused: <rule>`; the detail (which part, which counts) is logged here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from vfed.common import disclosure
from vfed.common.api import Reason, classified
from vfed.common.payload import is_parquet
from vfed.node import run_folder
from vfed.node.config import NodeSettings

log = logging.getLogger(__name__)

MIN_ROWS_ENV = "VFED_MIN_ROWS"
MIN_CELL_COUNT_ENV = "VFED_MIN_CELL_COUNT"
MAX_GLM_SATURATION_ENV = "VFED_MAX_GLM_SATURATION"


@dataclass(frozen=True)
class OutputRules:
    """What a run's output is held to."""

    reads_data: bool
    min_rows: int
    min_cell_count: int
    max_glm_saturation: float
    unchecked_allowed: bool
    max_structured_bytes: int
    epsilon: float | None = None

    @property
    def limits(self) -> disclosure.Limits:
        return disclosure.Limits(self.min_rows, self.min_cell_count, self.max_glm_saturation, self.epsilon)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> OutputRules:
        return cls(**json.loads(text))


def strictest(settings: NodeSettings, datasets: list[str] | tuple[str, ...]) -> tuple[int, int, float]:
    """(min_rows, min_cell_count, max_glm_saturation) of the node and the datasets, each at its strictest."""
    rows, cells, saturation = settings.min_rows, settings.min_cell_count, settings.max_glm_saturation
    own = [settings.datasets[d] for d in datasets if d in settings.datasets]
    rows = max([rows] + [d.min_rows for d in own if d.min_rows is not None]) if own else rows
    cells = max([cells] + [d.min_cell_count for d in own if d.min_cell_count is not None]) if own else cells
    sat = [d.max_glm_saturation for d in own if d.max_glm_saturation is not None]
    return rows, cells, min([saturation, *sat])


def rules_for(
    settings: NodeSettings, datasets: list[str], unchecked_allowed: bool, epsilon: float | None
) -> OutputRules:
    """The rules of a run that reads `datasets`, as accepted by the image policy and the budget."""
    rows, cells, saturation = strictest(settings, datasets)
    return OutputRules(
        reads_data=bool(datasets),
        min_rows=rows,
        min_cell_count=cells,
        max_glm_saturation=saturation,
        unchecked_allowed=unchecked_allowed,
        max_structured_bytes=settings.max_structured_output_bytes,
        epsilon=epsilon,
    )


def fallback_rules(settings: NodeSettings) -> OutputRules:
    """For a journaled run without rules (accepted by an older agent): as if it read every dataset of this
    node, with no unchecked output and no differentially private part allowed."""
    rows, cells, saturation = strictest(settings, list(settings.datasets))
    return OutputRules(True, rows, cells, saturation, False, settings.max_structured_output_bytes)


def environment(settings: NodeSettings, datasets: list[str]) -> dict[str, str]:
    """The limits the algorithm SDK checks early, the same numbers the node checks with."""
    rows, cells, saturation = strictest(settings, datasets)
    return {
        MIN_ROWS_ENV: str(rows),
        MIN_CELL_COUNT_ENV: str(cells),
        MAX_GLM_SATURATION_ENV: repr(saturation),
    }


@dataclass(frozen=True)
class Refusal:
    """Why an output is not released: `reason` leaves the node, `detail` goes to the node's log."""

    reason: str
    detail: str


def judge(run_dir: Path, rules: OutputRules, max_bytes: int) -> Refusal | None:
    """None when the stopped run's output may be sealed and released; else why not.

    The output is opened through run_folder (no link followed, never past max_bytes) and only read when
    it is small enough to be a structured output the node decodes.
    """
    if not rules.reads_data:
        return None
    size = run_folder.output_size(run_dir)
    document = None
    if size <= rules.max_structured_bytes:
        data = run_folder.read_output(run_dir, min(max_bytes, rules.max_structured_bytes))
        if not is_parquet(data):
            try:
                document = disclosure.load(data)
            except disclosure.MalformedParts as exc:
                return Refusal(classified(Reason.BAD_OUTPUT, "malformed structured output"), str(exc))
    if document is None:
        if rules.unchecked_allowed:
            return None
        rule = disclosure.Rule.UNCHECKED_OUTPUT
        detail = "the output is not structured parts and the image's policy refuses unchecked outputs"
        return Refusal(classified(Reason.DISCLOSURE_REFUSED, rule.value), detail)
    try:
        disclosure.check(document, rules.limits)
    except disclosure.DisclosureRefused as exc:
        return Refusal(classified(Reason.DISCLOSURE_REFUSED, exc.rule.value), exc.detail)
    return None
