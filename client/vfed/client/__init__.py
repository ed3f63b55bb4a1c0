"""vfed.client: the researcher's Python client.

    from vfed.client import Client

    with Client("http://127.0.0.1:7600", key_file="key.json") as client:
        client.login("alice", password)
        task = client.create_task(
            1, "vfed-examples/summary_stats", "summary", kwargs={"columns": ["age"]},
            organizations=[client.organization_id],
        )
        client.wait(task)
        print(client.results(task))

`Client` blocks (scripts, notebooks); `AsyncClient` has the same methods as coroutines. What a script
catches or inspects is here too: `ResultSet` and `OrganizationResult` (what `results` returns), `TaskFailed`
and `RunFailed` (a failed run), `TaskTimeout` and `WaitInterrupted` (a wait that ended early). The resources
the listing and reading methods return are the server's own models (`vfed.common.api.resources`):
`Organization`, `Collaboration`, `Node`, `Task` (`CreatedTask` from `create_task`) and `Run`.
"""

from vfed.client.client import AsyncClient, Client, WaitInterrupted
from vfed.client.errors import ClientError, RunFailed, TaskFailed, TaskTimeout
from vfed.client.results import OrganizationResult, ResultSet
from vfed.client.tasks import CreatedTask
from vfed.common.api.resources import Collaboration, Node, Organization, Run, Task

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "Collaboration",
    "CreatedTask",
    "Node",
    "Organization",
    "OrganizationResult",
    "ResultSet",
    "Run",
    "RunFailed",
    "Task",
    "TaskFailed",
    "TaskTimeout",
    "WaitInterrupted",
]
