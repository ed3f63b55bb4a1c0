"""The wire contract between vfed's components: what crosses the network and must mean the same everywhere.

The run and task statuses and how a task's status follows from its runs (`statuses`), the classified reasons
a run ends with (`reasons`), how a run's log is sealed (`run_log`), the error document (`errors`), the
resources the server serves (`resources`), the proxy's API (`proxy`), the doorbell message (`doorbell`) and
the one REST client every component calls the server with (`rest`): each thing on the wire is defined once.
"""

from vfed.common.api.reasons import (
    EXIT_ALGORITHM_ERROR,
    EXIT_DISCLOSURE,
    EXIT_OK,
    EXIT_SETUP_ERROR,
    Reason,
    algorithm_error,
    classified,
    code_of,
)
from vfed.common.api.run_log import (
    RunLogError,
    log_context,
    open_log,
    seal_log,
)

__all__ = [
    "EXIT_ALGORITHM_ERROR",
    "EXIT_DISCLOSURE",
    "EXIT_OK",
    "EXIT_SETUP_ERROR",
    "Reason",
    "RunLogError",
    "algorithm_error",
    "classified",
    "code_of",
    "log_context",
    "open_log",
    "seal_log",
]
