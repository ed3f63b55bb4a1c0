"""vfed.algorithms: the SDK that algorithm images are built with.

Declare functions with `@federated(datasets=[...])` (run at the data, receive DataFrames) and `@central()`
(orchestrate subtasks, receive an `AlgorithmClient`); the image's entry point `python -m vfed.algorithms`
does the rest. A federated function returns its result as `Parts` whose kinds (`Counts`, `Histogram`,
`Aggregate`, `Model`, `DP`) the node checks against its disclosure rules before releasing anything. Imports
only `vfed.common`; pandas is loaded when a dataset is.
"""

from vfed.algorithms.client import AlgorithmClient, SubtaskFailed
from vfed.algorithms.decorators import central, federated
from vfed.algorithms.disclosure import (
    DisclosureError,
    min_cell_count,
    min_rows,
    require_min_cells,
    require_min_rows,
)
from vfed.algorithms.transport import ProxyError, ProxyUnavailable
from vfed.common.api.proxy import Organization, TaskState
from vfed.common.disclosure import DP, Aggregate, Counts, Histogram, Model, Parts
from vfed.common.payload import AlgorithmError, TaskInput

__all__ = [
    "DP",
    "Aggregate",
    "AlgorithmClient",
    "AlgorithmError",
    "Counts",
    "DisclosureError",
    "Histogram",
    "Model",
    "Organization",
    "Parts",
    "ProxyError",
    "ProxyUnavailable",
    "SubtaskFailed",
    "TaskInput",
    "TaskState",
    "central",
    "federated",
    "min_cell_count",
    "min_rows",
    "require_min_cells",
    "require_min_rows",
]
