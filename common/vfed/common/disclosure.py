"""Structured outputs: results whose parts declare what they are, so a node can apply its disclosure rules.

The image is not trusted to apply the rules itself. A federated function returns `Parts` (or one part),
and the bytes it leaves say, part by part, what each holds: a count table, a histogram, an aggregate over n
records, a model's statistics over n rows with p parameters, or a differentially private release. The node
decodes that document before any byte of it is sealed and refuses an output that breaks one of its rules
(`check`), naming the rule (`Rule`) and nothing of the data. The algorithm SDK runs the same `check` first,
so an author sees the refusal with a clear message.

The wire form is JSON, checked without pandas and bounded in size by the node:
`{"vfed": 1, "format": "parts", "parts": {"<name>": {"kind": "counts", ...}, ...}, "single": false}`.
Researchers never see parts: `decoded` turns the document into plain values (vfed.common.payload does it
for every result), the same shapes the function would have returned without the wrapping.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PARTS_FORMAT = "parts"
MAX_PARTS = 10_000
MAX_DEPTH = 8
DEFAULT_MIN_ROWS = 10
DEFAULT_MIN_CELL_COUNT = 5
DEFAULT_MAX_GLM_SATURATION = 0.33
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
_MECHANISM = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


class Rule(StrEnum):
    """The disclosure rules, by the name a refusal carries (`disclosure-refused: <rule>`)."""

    MIN_CELL_COUNT = "min-cell-count"
    """A count, histogram bin or table cell between 1 and min_cell_count - 1 (0 is allowed)."""
    MIN_ROWS = "min-rows"
    """An aggregate or model over fewer than min_rows records."""
    GLM_SATURATION = "glm-saturation"
    """A model with more parameters per record than max_glm_saturation allows."""
    DP_BUDGET = "dp-budget"
    """A differentially private part the node granted no (or too little) epsilon for."""
    UNCHECKED_OUTPUT = "unchecked-output"
    """An output that is not a structured one, from an image the node's policy does not allow that."""


class DisclosureRefused(Exception):
    """An output breaks a disclosure rule. `rule` may leave the node; `detail` (values, limits) stays."""

    def __init__(self, rule: Rule, detail: str) -> None:
        super().__init__(f"{rule.value}: {detail}")
        self.rule = rule
        self.detail = detail


class MalformedParts(ValueError):
    """A document that says it is structured but is not a valid one."""


@dataclass(frozen=True)
class Limits:
    """The numbers the rules are checked with (the node's, strictest over the run's datasets)."""

    min_rows: int = DEFAULT_MIN_ROWS
    min_cell_count: int = DEFAULT_MIN_CELL_COUNT
    max_glm_saturation: float = DEFAULT_MAX_GLM_SATURATION
    epsilon: float | None = None
    """The epsilon the node charged for this run; None: no differentially private part is accepted."""


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _numbers(value: Any, where: str, max_length: int | None = None, depth: int = 0) -> Any:
    """A number, flag, null or (nested) list of them, each list at most max_length long; MalformedParts
    else."""
    if value is None or isinstance(value, bool) or _is_number(value):
        return value
    if isinstance(value, list) and depth < MAX_DEPTH:
        if max_length is not None and len(value) > max_length:
            raise ValueError(f"{where}: a list of {len(value)} values, more than the {max_length} declared")
        return [_numbers(v, where, max_length, depth + 1) for v in value]
    raise ValueError(f"{where}: only numbers, null and lists of them are allowed")


def _count_cells(value: Any, depth: int = 0) -> Any:
    """Non-negative whole numbers, as a list or a mapping of labels, nested up to MAX_DEPTH."""
    if isinstance(value, bool):  # a flag beside the counts (a level is rare here): not a count
        return value
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a count is negative")
        return value
    if depth >= MAX_DEPTH:
        raise ValueError(f"counts nest deeper than {MAX_DEPTH}")
    if isinstance(value, list):
        return [_count_cells(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _count_cells(v, depth + 1) for k, v in value.items()}
    raise ValueError("counts must be whole numbers, in lists or mappings of labels")


def _cells(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    items = value.values() if isinstance(value, dict) else value
    return [cell for item in items for cell in _cells(item)]


def _released(value: Any) -> Any:
    """A released statistic: a number (or a flag), or a mapping of names to numbers; no lists."""
    if isinstance(value, dict):
        return {str(k): _numbers(v, f"value {k!r}", max_length=0) for k, v in value.items()}
    return _numbers(value, "value", max_length=0)


Released = Annotated[Any, AfterValidator(_released)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Counts(_Part):
    """A count table or contingency table: `cells` is {label: count}, nested for more dimensions, or a
    list; true/false flags may stand beside the counts. Every count is 0 or at least min_cell_count.
    Decodes to `cells`."""

    kind: Literal["counts"] = "counts"
    cells: Any

    @field_validator("cells")
    @classmethod
    def _valid(cls, value: Any) -> Any:
        return _count_cells(value)


class Histogram(_Part):
    """Bin counts over edges (len(edges) == len(counts) + 1); every bin is 0 or at least min_cell_count.
    Decodes to {"edges": [...], "counts": [...]}."""

    kind: Literal["histogram"] = "histogram"
    edges: list[float]
    counts: list[Annotated[int, Field(ge=0, strict=True)]]

    @model_validator(mode="after")
    def _shape(self) -> Histogram:
        if len(self.edges) != len(self.counts) + 1:
            raise ValueError("a histogram has one edge more than it has bins")
        if not all(math.isfinite(e) for e in self.edges):
            raise ValueError("histogram edges must be finite")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("histogram edges must increase")
        return self


class Aggregate(_Part):
    """Statistics over n records: `value` is a number or {name: number}; `counts` are named counts that go
    with it (each checked as a cell). n is 0 or at least min_rows. Decodes to `value` when it is a number,
    else to {"n": n, **counts, **value}."""

    kind: Literal["aggregate"] = "aggregate"
    n: int = Field(ge=0, strict=True)
    value: Released
    counts: dict[str, Annotated[int, Field(ge=0, strict=True)]] = Field(default_factory=dict)


class Model(_Part):
    """A model's statistics (coefficients, gradient, Hessian, deviance ...) over n rows with `parameters`
    parameters: every list in `values` is at most `parameters` long (a vector of p, a p x p matrix).
    n is at least min_rows and parameters / n at most max_glm_saturation. Decodes to {"n": n, **values}."""

    kind: Literal["model"] = "model"
    n: int = Field(ge=0, strict=True)
    parameters: int = Field(ge=1, strict=True)
    values: dict[str, Any]

    @model_validator(mode="after")
    def _shape(self) -> Model:
        if "n" in self.values:
            raise ValueError("a model's values cannot be named 'n' (n is declared beside them)")
        for name, value in self.values.items():
            _numbers(value, f"model value {name!r}", max_length=self.parameters)
        return self


class DP(_Part):
    """A differentially private release that spent `epsilon` (the node must have charged at least the sum
    of its parts' epsilons): `value` is a number or {name: number}. Decodes to `value` when it is a number,
    else to {**value, "epsilon": epsilon, "mechanism": mechanism}."""

    kind: Literal["dp"] = "dp"
    epsilon: float = Field(gt=0, allow_inf_nan=False)
    mechanism: str = "laplace"
    value: Released

    @field_validator("mechanism")
    @classmethod
    def _mechanism(cls, value: str) -> str:
        if not _MECHANISM.fullmatch(value):
            raise ValueError("a mechanism is a short lower-case name (laplace, gaussian, ...)")
        return value


Part = Annotated[Counts | Histogram | Aggregate | Model | DP, Field(discriminator="kind")]
PART_TYPES = (Counts, Histogram, Aggregate, Model, DP)


class PartsDocument(BaseModel):
    """The wire form of a structured output."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vfed: Literal[1] = 1
    format: Literal["parts"] = "parts"
    parts: dict[str, Part] = Field(min_length=1, max_length=MAX_PARTS)
    single: bool = False
    """The function returned one part: it decodes to that part's value, not to {name: value}."""

    @field_validator("parts")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _NAME.fullmatch(name):
                raise ValueError(f"part name {name[:40]!r}: 1 to 200 characters, none a control character")
        return value

    @model_validator(mode="after")
    def _one_when_single(self) -> PartsDocument:
        if self.single and len(self.parts) != 1:
            raise ValueError("a single-part document has exactly one part")
        return self


class Parts:
    """What a federated function returns for the node to check: named parts (`Parts(age=Aggregate(...))`,
    or `Parts({"age": ...})` for names that are not identifiers)."""

    def __init__(self, named: Mapping[str, Any] | None = None, /, **parts: Any) -> None:
        self.parts: dict[str, Any] = {**(named or {}), **parts}

    def document(self) -> PartsDocument:
        try:
            return PartsDocument(parts=self.parts)
        except ValidationError as exc:
            raise MalformedParts(_first_error(exc)) from None


def as_document(value: object) -> PartsDocument | None:
    """The document of a `Parts` or a single part; None for any other value."""
    if isinstance(value, Parts):
        return value.document()
    if isinstance(value, PART_TYPES):
        return PartsDocument(parts={"value": value}, single=True)
    return None


def encode(document: PartsDocument) -> bytes:
    """The wire form (UTF-8 JSON)."""
    return document.model_dump_json(exclude_defaults=False).encode()


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "document"
    return f"{where}: {first['msg']}"


def parse(document: Mapping[str, Any]) -> PartsDocument:
    """An already-loaded JSON document as a structured output; MalformedParts when it is not a valid one."""
    try:
        return PartsDocument.model_validate(document)
    except ValidationError as exc:
        raise MalformedParts(_first_error(exc)) from None


def load(data: bytes) -> PartsDocument | None:
    """The structured output in `data`, None when the bytes are another kind of output (plain JSON, Parquet,
    not JSON at all); MalformedParts when they say they are structured but are not valid."""
    if b'"parts"' not in data:  # cheap: a plain result is not parsed (an escaped name is not structured)
        return None
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("format") != PARTS_FORMAT:
        return None
    return parse(document)


def _check_cells(name: str, cells: list[int], limit: int) -> None:
    small = sum(1 for cell in cells if 0 < cell < limit)
    if small:
        raise DisclosureRefused(
            Rule.MIN_CELL_COUNT, f"part {name!r}: {small} count(s) between 1 and {limit - 1} (min {limit})"
        )


def _check_rows(name: str, n: int, limit: int, allow_zero: bool) -> None:
    if n < limit and not (allow_zero and n == 0):
        raise DisclosureRefused(Rule.MIN_ROWS, f"part {name!r}: over {n} records (min {limit})")


def _check_part(name: str, part: Any, limits: Limits) -> float:
    """Raise DisclosureRefused when the part breaks a rule; the epsilon it spends (0 unless DP)."""
    if isinstance(part, Counts):
        _check_cells(name, _cells(part.cells), limits.min_cell_count)
    elif isinstance(part, Histogram):
        _check_cells(name, part.counts, limits.min_cell_count)
    elif isinstance(part, Aggregate):
        _check_rows(name, part.n, limits.min_rows, allow_zero=True)
        _check_cells(name, list(part.counts.values()), limits.min_cell_count)
    elif isinstance(part, Model):
        _check_rows(name, part.n, max(limits.min_rows, 1), allow_zero=False)
        if part.parameters > limits.max_glm_saturation * part.n:
            raise DisclosureRefused(
                Rule.GLM_SATURATION,
                f"part {name!r}: {part.parameters} parameters over {part.n} rows "
                f"(at most {limits.max_glm_saturation:g} per row)",
            )
    elif isinstance(part, DP):
        return part.epsilon
    return 0.0


def check(document: PartsDocument, limits: Limits) -> None:
    """Raise DisclosureRefused at the first part that breaks a rule."""
    spent = sum(_check_part(name, part, limits) for name, part in document.parts.items())
    if spent > 0:
        if limits.epsilon is None:
            raise DisclosureRefused(Rule.DP_BUDGET, "a differentially private part, but no epsilon charged")
        if spent > limits.epsilon * (1 + 1e-9):
            raise DisclosureRefused(
                Rule.DP_BUDGET, f"the parts spend epsilon {spent:g}, the node charged {limits.epsilon:g}"
            )


def _part_value(part: Any) -> Any:
    if isinstance(part, Counts):
        return part.cells
    if isinstance(part, Histogram):
        return {"edges": part.edges, "counts": part.counts}
    if isinstance(part, Model):
        return {"n": part.n, **part.values}
    if not isinstance(part.value, dict):  # an aggregate or a release of one number
        return part.value
    if isinstance(part, Aggregate):
        return {"n": part.n, **part.counts, **part.value}
    return {**part.value, "epsilon": part.epsilon, "mechanism": part.mechanism}


def decoded(document: PartsDocument) -> Any:
    """The plain values a researcher (or a central function) receives: {name: value}, or the lone part's
    value for a single-part document."""
    values = {name: _part_value(part) for name, part in document.parts.items()}
    if document.single:
        return next(iter(values.values()))
    return values
