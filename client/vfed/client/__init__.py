"""vfed.client: the researcher's Python client.

    from vfed.client import Client

    with Client("http://127.0.0.1:7600", key_file="key.json") as client:
        client.login("alice", password)
        task = client.create_task(1, "vfed-examples/stats", "summary", args=["age"])
        client.wait(task)
        print(client.results(task))

`Client` blocks (scripts, notebooks); `AsyncClient` has the same methods as coroutines.
"""

from vfed.client.client import AsyncClient, Client
from vfed.client.errors import ClientError

__all__ = ["AsyncClient", "Client", "ClientError"]
