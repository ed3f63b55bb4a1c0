"""The classified reasons a run ends with: the only failure text that leaves a node in the clear.

A run's `reason` reaches the server (which is not trusted for confidentiality) and the initiating researcher
(who may belong to another organization than the data). Free text from the algorithm or from an exception
(`str(exc)`, a log tail, a traceback) has carried other organizations' data values before: a conversion
error prints the cell it could not convert. So what a node reports for a run that ran is one of these codes,
optionally followed by `: ` and a detail the node itself composed from nothing but its own configuration (an
exception's *type* name, a limit, a policy's words), never from the data or the algorithm's output. The
algorithm's own words stay in its log, which is sealed to the node's organization (`run_log`).

Refusals before a run starts (policy, trust and lease checks) keep their own codes (`untrusted-key: ...`,
`lease-expired: ...`, `image-incompatible: ...`); they are the node's words about its rules, not the run's.
"""

from __future__ import annotations

import re
from enum import StrEnum

# The algorithm SDK's exit codes (vfed.algorithms.wrapper), which the node classifies by.
EXIT_OK = 0
EXIT_ALGORITHM_ERROR = 1
"""The algorithm raised; the error output (kept on the node) names the exception type."""
EXIT_SETUP_ERROR = 2
"""The run could not start: a bad input, an unknown method, a missing dataset."""
EXIT_DISCLOSURE = 3
"""Disclosure control refused (too few records, a small count, a saturated model); the error output may
name the rule (vfed.common.disclosure.Rule), which the node then puts in the reason."""


class Reason(StrEnum):
    """The first word of a run's `reason`."""

    DISCLOSURE_REFUSED = "disclosure-refused"
    """Disclosure control refused to release the output: `disclosure-refused: <rule>` (min-rows,
    min-cell-count, glm-saturation, dp-budget, unchecked-output; vfed.common.disclosure.Rule), checked by
    the SDK first and by the node on the output itself; or the node's privacy budget refused the run."""
    BAD_INPUT = "bad-input"
    """The run's input could not be used (not decryptable, not a valid task input, unknown method/dataset)."""
    OUT_OF_MEMORY = "out-of-memory"
    """The container reached its memory limit and the kernel killed it."""
    TIMEOUT = "timeout"
    """The run passed its wall-clock limit (max_run_time_s) and was killed."""
    ALGORITHM_ERROR = "algorithm-error"
    """The algorithm failed; the detail is its exception's type name when the SDK reported one."""
    BAD_OUTPUT = "bad-output"
    """The algorithm exited 0 but left no usable output (none, not a regular file, over the size limit)."""
    KILLED = "killed"
    """Stopped on request (the initiator, the node's operator, a revoked or expired lease)."""
    LOST = "lost"
    """The container disappeared while it ran."""
    NODE_ERROR = "node-error"
    """The node agent itself failed on this run; the detail is the exception's type name."""
    RESULT_WITHHELD = "result-withheld"
    """The run completed, but its descriptor no longer verifies here: its output is not released."""
    IMAGE_INCOMPATIBLE = "image-incompatible"
    """Refused before start: the image's `vfed.sdk` label declares a payload format or proxy API version the
    node does not speak (vfed.common.sdk)."""
    IMAGE_UNAVAILABLE = "image-unavailable"
    """Refused before start: the node could not find the run's image where it runs images from (not in
    the engine or the registry, or its content did not match its digest); the detail names the image."""
    DATASET_UNAVAILABLE = "dataset-unavailable"
    """A dataset the run reads could not be prepared before the start (a `sql` dataset's database refused the
    credentials, cannot be reached, lacks the table, or its query failed); the detail names the dataset and
    the kind of failure, never the database's own message (it can quote data)."""


_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}(?:\.[A-Za-z_][A-Za-z0-9_]{0,99}){0,7}")
_MAX_DETAIL = 300


def classified(code: Reason, detail: str | None = None) -> str:
    """`code` or `code: detail`; the detail must be the node's own words (one line, at most 300 chars)."""
    if not detail:
        return code.value
    line = " ".join(detail.split())[:_MAX_DETAIL]
    return f"{code.value}: {line}"


def type_name(name: object) -> str | None:
    """`name` when it looks like a Python (dotted) class name, else None: a type name is all of an
    exception that may leave the node, and a string the algorithm shaped otherwise is not passed on."""
    if isinstance(name, str) and len(name) <= 200 and _TYPE_NAME.fullmatch(name):
        return name
    return None


def algorithm_error(exception_type: object = None) -> str:
    """`algorithm-error: <type>` (the type only when it is a plain class name), else `algorithm-error`."""
    return classified(Reason.ALGORITHM_ERROR, type_name(exception_type))


def code_of(reason: str | None) -> str | None:
    """The code a reason starts with (`algorithm-error` of `algorithm-error: KeyError`); None when empty."""
    if not reason:
        return None
    return reason.partition(":")[0].strip() or None
