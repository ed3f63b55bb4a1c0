"""Test algorithm for the node agent: reads INPUT_FILE (a TaskInput), writes OUTPUT_FILE (a vfed result).

Methods: echo (args/env back), files (each dataset's variables, size and, for a Parquet file, its row count
read from the footer without pyarrow), sleep (seconds), fail (exit code), no_output, big_output (bytes),
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


def _varint(data, pos):
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


_FIXED_BYTES = {1: 0, 2: 0, 3: 1, 7: 8}
"""Thrift compact types of a fixed size: booleans (in the type nibble), a byte, a double."""


def _skip(data, pos, kind):
    """Skip one Thrift compact-protocol value of this type; the position after it."""
    if kind in _FIXED_BYTES:
        return pos + _FIXED_BYTES[kind]
    if kind in (4, 5, 6):  # i16, i32, i64: varints
        return _varint(data, pos)[1]
    if kind == 8:
        size, pos = _varint(data, pos)
        return pos + size
    if kind in (9, 10):
        return _skip_list(data, pos)
    if kind == 11:
        return _skip_map(data, pos)
    if kind == 12:
        return _skip_struct(data, pos)
    raise ValueError(f"unknown thrift type {kind}")


def _skip_list(data, pos):
    head = data[pos]
    pos += 1
    size, element = head >> 4, head & 0x0F
    if size == 15:
        size, pos = _varint(data, pos)
    for _ in range(size):
        pos = pos + 1 if element in (1, 2) else _skip(data, pos, element)
    return pos


def _skip_map(data, pos):
    size, pos = _varint(data, pos)
    if size:
        types = data[pos]
        pos += 1
        for _ in range(size):
            pos = _skip(data, pos, types >> 4)
            pos = _skip(data, pos, types & 0x0F)
    return pos


def _skip_struct(data, pos):
    while data[pos] != 0:
        head = data[pos]
        pos += 1
        if not head >> 4:  # a field id of its own (a zigzag varint) instead of a delta
            pos = _varint(data, pos)[1]
        pos = _skip(data, pos, head & 0x0F)
    return pos + 1


def parquet_rows(path):
    """FileMetaData.num_rows (field 3, an i64) from the footer of a Parquet file."""
    with open(path, "rb") as handle:
        handle.seek(-8, os.SEEK_END)
        tail = handle.read(8)
        if tail[4:] != b"PAR1":
            return None
        length = int.from_bytes(tail[:4], "little")
        handle.seek(-8 - length, os.SEEK_END)
        data = handle.read(length)
    pos, field = 0, 0
    while data[pos] != 0:
        head = data[pos]
        pos += 1
        delta, kind = head >> 4, head & 0x0F
        field = field + delta if delta else None
        if field is None:
            raw, pos = _varint(data, pos)
            field = (raw >> 1) ^ -(raw & 1)
        if field == 3 and kind == 6:
            raw, pos = _varint(data, pos)
            return (raw >> 1) ^ -(raw & 1)
        pos = _skip(data, pos, kind)
    return None


def files(args, kwargs):
    found = {}
    for label in filter(None, os.environ.get("DATASETS", "").split(",")):
        prefix = f"DATASET_{label.upper()}_"
        uri = os.environ[prefix + "URI"]
        with open(uri, "rb") as handle:
            head = handle.read(4)
        found[label] = {
            "env": {k[len(prefix) :]: v for k, v in os.environ.items() if k.startswith(prefix)},
            "size": os.path.getsize(uri),
            "head": head.decode("latin-1"),
            "parquet_rows": parquet_rows(uri) if head == b"PAR1" else None,
        }
    return {"datasets": found, "environment": sorted(os.environ)}


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
    elif method == "files":
        write_result(files(args, kwargs))
    else:
        write_result(echo(args, kwargs))
    print("probe: done", flush=True)


if __name__ == "__main__":
    main()
