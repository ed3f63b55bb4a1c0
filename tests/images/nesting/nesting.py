"""Test algorithm for the researcher client's results: reads INPUT_FILE (a TaskInput), writes OUTPUT_FILE.

Methods:
- `rows`: a table as a list of records, `[{"organization_id": <this org>, "n": 0}, {..., "n": 1}]`;
- `scalar`: a number (this organization's id), which is not a table;
- `nest`: kwargs `levels` (a list of organization-id lists) and `fail_at` (an organization id). With levels
  left, it creates a subtask `nest` at `levels[0]` with the rest through the proxy socket and waits; when a
  run of it failed it fails with the SDK's error document naming `SubtaskFailed`. With none left it fails
  with `ValueError` at `fail_at` and returns its depth elsewhere.
"""

import http.client
import json
import os
import socket
import sys


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def proxy(method, path, body=None):
    conn = UnixConnection(os.environ["PROXY_SOCKET"], 120)
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def write(document):
    with open(os.environ["OUTPUT_FILE"], "w") as handle:
        json.dump({"vfed": 1, **document}, handle)


def fail(exc_type, message):
    """The SDK's error document and exit code 1: the node reports `algorithm-error: <exc_type>`."""
    print(f"nesting: {exc_type}: {message}", file=sys.stderr, flush=True)
    write({"format": "error", "error": {"type": exc_type, "message": message, "traceback": ""}})
    sys.exit(1)


def nest(levels, fail_at):
    here = int(os.environ["ORGANIZATION_ID"])
    if not levels:
        if here == fail_at:
            fail("ValueError", "asked to fail here")
        return {"organization_id": here}
    new = {
        "name": "nest",
        "input": {"method": "nest", "kwargs": {"levels": levels[1:], "fail_at": fail_at}},
        "organizations": levels[0],
    }
    status, body = proxy("POST", "/tasks", new)
    if status != 201:
        fail("RuntimeError", f"subtask creation answered {status}")
    task_id = json.loads(body)["task_id"]
    while True:
        status, body = proxy("GET", f"/tasks/{task_id}/wait?timeout_s=30")
        view = json.loads(body)
        if view.get("done"):
            break
    failed = [r for r in view["runs"] if r["status"] != "completed"]
    if failed:
        fail("SubtaskFailed", f"{len(failed)} run(s) of subtask {task_id} failed")
    return {"subtask": task_id}


def main():
    with open(os.environ["INPUT_FILE"]) as handle:
        task_input = json.load(handle)
    method, kwargs = task_input["method"], task_input.get("kwargs", {})
    here = int(os.environ["ORGANIZATION_ID"])
    if method == "rows":
        value = [{"organization_id": here, "n": n} for n in range(2)]
    elif method == "scalar":
        value = here
    elif method == "nest":
        value = nest(kwargs["levels"], kwargs["fail_at"])
    else:
        fail("KeyError", f"no method {method}")
    write({"format": "json", "value": value})


if __name__ == "__main__":
    main()
