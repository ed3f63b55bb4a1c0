"""What a researcher's script names comes from `vfed.client` itself: the clients, what `results()` returns
and the errors a script catches, each the very class the modules that raise or build it use (so an
`except TaskFailed` written against the package catches what `results()` raises)."""

from __future__ import annotations

import vfed.client
import vfed.client.client
import vfed.client.errors
import vfed.client.results
from vfed.common.api import resources


def test_the_package_names_the_classes_a_script_uses() -> None:
    from vfed.client import (
        AsyncClient,
        Client,
        OrganizationResult,
        ResultSet,
        RunFailed,
        TaskFailed,
        TaskTimeout,
        WaitInterrupted,
    )

    assert AsyncClient is vfed.client.client.AsyncClient and Client is vfed.client.client.Client
    assert ResultSet is vfed.client.results.ResultSet
    assert OrganizationResult is vfed.client.results.OrganizationResult
    assert TaskFailed is vfed.client.errors.TaskFailed and RunFailed is vfed.client.errors.RunFailed
    assert TaskTimeout is vfed.client.errors.TaskTimeout
    assert WaitInterrupted is vfed.client.client.WaitInterrupted
    assert issubclass(TaskFailed, RunFailed)
    # the resources the client returns are the server's own models
    from vfed.client import Collaboration, CreatedTask, Node, Organization, Run, Task

    assert (Organization, Collaboration, Node, Run, Task) == (
        resources.Organization,
        resources.Collaboration,
        resources.Node,
        resources.Run,
        resources.Task,
    )
    assert issubclass(CreatedTask, Task)
    assert sorted(vfed.client.__all__) == sorted(
        [
            "AsyncClient",
            "Client",
            "ClientError",
            "Collaboration",
            "CreatedTask",
            "Node",
            "Organization",
            "Run",
            "Task",
            "OrganizationResult",
            "ResultSet",
            "RunFailed",
            "TaskFailed",
            "TaskTimeout",
            "WaitInterrupted",
        ]
    )
    assert all(hasattr(vfed.client, name) for name in vfed.client.__all__)
