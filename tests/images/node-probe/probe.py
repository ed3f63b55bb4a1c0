"""Test algorithm for the node agent: reads INPUT_FILE (a TaskInput), writes OUTPUT_FILE (a vfed result).

Methods: echo (args/env back), sleep (seconds), fail (exit code), no_output, big_output (bytes),
stream_output (a JSON result holding a string of N bytes, written 1 MiB at a time: bounded memory),
master (creates a subtask through the proxy socket and sums the results), proxy_probe (tries forbidden calls).
"""

import http.client
import json
import os
import socket
import sys
import time


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def proxy(method, path, body=None, timeout=120):
    conn = UnixConnection(os.environ["PROXY_SOCKET"], timeout)
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def write_result(value):
    document = {"vfed": 1, "format": "json", "value": value}
    with open(os.environ["OUTPUT_FILE"], "w") as handle:
        json.dump(document, handle)


def first_lines():
    lines = {}
    for label in filter(None, os.environ.get("DATASETS", "").split(",")):
        with open(os.environ[f"DATASET_{label.upper()}_URI"]) as handle:
            lines[label] = handle.readline().strip()
    return lines


def echo(args, kwargs):
    return {
        "datasets": first_lines(),
        "epsilon_granted": os.environ.get("VFED_EPSILON_GRANTED"),
        "organization_id": int(os.environ["ORGANIZATION_ID"]),
        "run_id": int(os.environ["RUN_ID"]),
        "args": args,
        "kwargs": kwargs,
        "value": sum(args) * int(os.environ["ORGANIZATION_ID"])
        if all(isinstance(a, int) for a in args)
        else None,
    }


def master(args, kwargs):
    status, body = proxy("GET", "/organizations")
    orgs = [o["id"] for o in json.loads(body)["data"]]
    new = {"name": "sub", "input": {"method": "echo", "args": args}, "organizations": orgs}
    status, body = proxy("POST", "/tasks", new)
    if status != 201:
        raise SystemExit(f"subtask creation failed: {status} {body!r}")
    task_id = json.loads(body)["task_id"]
    while True:
        status, body = proxy("GET", f"/tasks/{task_id}/wait?timeout_s=30")
        view = json.loads(body)
        if view["done"]:
            break
    values = {}
    for run in view["runs"]:
        status, body = proxy("GET", f"/runs/{run['run_id']}/result")
        if status != 200:
            raise SystemExit(f"result of run {run['run_id']}: {status} {body!r}")
        values[str(run["organization_id"])] = json.loads(body)["value"]["value"]
    return {"subtask": task_id, "by_org": values, "total": sum(values.values())}


def forkbomb():
    forks = 0
    while forks < 100_000:
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        forks += 1
    return forks


def proxy_probe(args, kwargs):
    outcomes = {}
    for method, path in [
        ("GET", "/run"),
        ("GET", "/nodes"),
        ("DELETE", "/run"),
        ("GET", "/blobs/x"),
        ("POST", "/token/node"),
        ("GET", "/runs/1/result"),
    ]:
        status, _ = proxy(method, path)
        outcomes[f"{method} {path}"] = status
    return outcomes


def main():
    with open(os.environ["INPUT_FILE"]) as handle:
        task_input = json.load(handle)
    method = task_input["method"]
    args, kwargs = task_input.get("args", []), task_input.get("kwargs", {})
    print(f"probe: {method} {args} {kwargs}", flush=True)
    if method == "sleep":
        time.sleep(float(args[0]))
        write_result({"slept": args[0]})
    elif method == "fail":
        print("probe: failing on purpose", file=sys.stderr, flush=True)
        sys.exit(int(args[0]) if args else 3)
    elif method == "no_output":
        return
    elif method == "big_output":
        with open(os.environ["OUTPUT_FILE"], "wb") as handle:
            handle.write(b"x" * int(args[0]))
    elif method == "stream_output":
        left, block = int(args[0]), b"x" * (1024 * 1024)
        with open(os.environ["OUTPUT_FILE"], "wb") as handle:
            handle.write(b'{"vfed":1,"format":"json","value":"')  # encode_result's own layout
            while left > 0:
                handle.write(block[: min(left, len(block))])
                left -= len(block)
            handle.write(b'"}')
    elif method == "symlink_output":
        os.symlink(args[0], os.environ["OUTPUT_FILE"])
    elif method == "late_proxy":
        time.sleep(float(args[0]))
        status, body = proxy("GET", "/run")
        write_result({"status": status, "run": json.loads(body)})
    elif method == "membomb":
        hoard = []
        while True:
            hoard.append(bytearray(16 * 1024 * 1024))
    elif method == "forkbomb":
        write_result({"forks": forkbomb()})
    elif method == "master":
        write_result(master(args, kwargs))
    elif method == "proxy_probe":
        write_result(proxy_probe(args, kwargs))
    else:
        write_result(echo(args, kwargs))
    print("probe: done", flush=True)


if __name__ == "__main__":
    main()
