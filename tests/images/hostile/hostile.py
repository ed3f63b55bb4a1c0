"""A hostile algorithm: tries every way out of its container and reports each attempt as JSON.

Modes (first argument): `probes` (network, sockets, volumes, writes, privileges; one JSON report),
`forkbomb` (forks until the pids limit stops it, holds, reports), `membomb` (allocates until killed),
`output-symlink` and `output-fifo` (booby-trap the output file for the agent that reads it).
Targets come from the HOSTILE_TARGETS environment variable (JSON), so the test decides what to aim at.
The report goes to stdout as one line `HOSTILE-REPORT {...}` and, when writable, to OUTPUT_FILE.
Standard library only: the image must not need anything the test cannot build offline.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

REPORT_PREFIX = "HOSTILE-REPORT "
FORBIDDEN_FOLDERS = (
    "/",
    "/etc",
    "/usr/local/bin",
    "/opt",
    "/home",
    "/var/tmp",
    "/root",
    "/mnt",
    "/mnt/job",
    "/run",
)
Result = dict[str, Any]


def attempt(name: str, fn: Callable[[], Any]) -> Result:
    """Run one attempt; ok=True means the attempt SUCCEEDED (for a way out, that is a hole)."""
    started = time.monotonic()
    try:
        detail = fn()
        ok = True
    except Exception as exc:  # every failure is an outcome to report, never a crash
        detail = f"{type(exc).__name__}: {exc}"
        ok = False
        if isinstance(exc, OSError) and exc.errno is not None:
            detail = f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return {"name": name, "ok": ok, "detail": detail, "elapsed_s": round(time.monotonic() - started, 3)}


def tcp_connect(host: str, port: int, timeout_s: float) -> str:
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(b"hostile\n")
        return f"connected from {sock.getsockname()}"


def udp_send(host: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"hostile\n", (host, port))
        return "datagram sent"


def unix_http_get(path: str, url_path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(f"GET {url_path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def write_file(folder: str) -> str:
    path = os.path.join(folder, f"hostile-{os.getpid()}")
    with open(path, "w") as f:
        f.write("written by the hostile algorithm\n")
    return path


def exec_copy_of_true(folder: str) -> str:
    """Copy /bin/true into folder and execute it (a noexec mount refuses)."""
    target = os.path.join(folder, f"true-{os.getpid()}")
    shutil.copy("/bin/true", target)
    os.chmod(target, 0o755)
    subprocess.run([target], check=True, timeout=10)
    return target


def find_secrets(roots: list[str]) -> list[str]:
    """Contents of every file named secret.txt reachable from roots (other jobs' volumes hold one)."""
    found = []
    skip = {"/proc", "/sys", "/dev"}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
            if "secret.txt" in filenames:
                try:
                    with open(os.path.join(dirpath, "secret.txt")) as f:
                        found.append(f.read().strip())
                except OSError as exc:
                    found.append(f"unreadable: {exc.strerror}")
    return found


def status_field(name: str) -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def network_probes(targets: dict[str, Any]) -> list[Result]:
    results = []
    timeout_s = float(targets.get("timeout_s", 3))
    for host, port, label in targets.get("tcp", []):
        probe = lambda h=host, p=port: tcp_connect(h, p, timeout_s)  # noqa: E731
        results.append(attempt(f"tcp:{label}:{host}:{port}", probe))
    for host, port, label in targets.get("udp", []):
        results.append(attempt(f"udp:{label}:{host}:{port}", lambda h=host, p=port: udp_send(h, p)))
    results.append(attempt("dns:example.com", lambda: socket.getaddrinfo("example.com", 443)[0][4]))
    results.append(attempt("interfaces", lambda: sorted(os.listdir("/sys/class/net"))))
    for path in ("/var/run/docker.sock", "/run/docker.sock"):
        results.append(attempt(f"docker-socket:{path}", lambda p=path: unix_http_get(p, "/version")[:200]))
        results.append(attempt(f"docker-socket-present:{path}", lambda p=path: os.stat(p).st_mode))
    return results


def filesystem_probes(targets: dict[str, Any]) -> list[Result]:
    results = []
    run_dir = os.path.dirname(os.environ.get("OUTPUT_FILE", "/nonexistent/output"))
    temp = os.environ.get("TEMPORARY_FOLDER", "/nonexistent")
    for folder in FORBIDDEN_FOLDERS:
        results.append(attempt(f"write:{folder}", lambda d=folder: write_file(d)))
    for label in [x for x in os.environ.get("DATASETS", "").split(",") if x]:
        uri = os.environ.get(f"DATASET_{label.upper().replace('-', '_')}_URI", "")
        folder = uri if os.path.isdir(uri) else os.path.dirname(uri)
        results.append(attempt(f"write:dataset:{label}", lambda d=folder: write_file(d)))
        results.append(attempt(f"read:dataset:{label}", lambda u=uri: open(u).read(200)))  # noqa: SIM115
    results.append(attempt("write:run-dir", lambda: write_file(run_dir)))
    results.append(attempt("write:temporary-folder", lambda: write_file(temp)))
    results.append(attempt("write:/tmp", lambda: write_file("/tmp")))
    results.append(attempt("exec:/tmp", lambda: exec_copy_of_true("/tmp")))
    results.append(attempt("exec:temporary-folder", lambda: exec_copy_of_true(temp)))
    results.append(attempt("read:input", lambda: open(os.environ["INPUT_FILE"]).read(200)))  # noqa: SIM115
    guesses = [f"/var/lib/docker/volumes/{v}/_data/secret.txt" for v in targets.get("volumes", [])]
    for path in guesses:
        results.append(attempt(f"read:{path}", lambda p=path: open(p).read()))  # noqa: SIM115
    secrets = find_secrets(["/"])
    results.append({"name": "find-secrets", "ok": bool(secrets), "detail": secrets, "elapsed_s": 0})
    return results


def privilege_probes() -> list[Result]:
    def become_root() -> str:
        os.setuid(0)
        return "uid 0"

    def effective_caps() -> str:
        caps = status_field("CapEff")
        if int(caps, 16) == 0:
            raise PermissionError(errno.EPERM, f"no effective capabilities (CapEff {caps})")
        return caps

    def chown_run_dir() -> str:
        os.chown(os.path.dirname(os.environ.get("OUTPUT_FILE", "/")), 0, 0)
        return "chowned to root"

    identity = {"uid": os.getuid(), "gid": os.getgid(), "no_new_privs": status_field("NoNewPrivs")}
    return [
        attempt("setuid-root", become_root),
        attempt("capabilities", effective_caps),
        attempt("chown-to-root", chown_run_dir),
        {"name": "identity", "ok": True, "detail": identity, "elapsed_s": 0},
    ]


def proxy_probe() -> list[Result]:
    path = os.environ.get("PROXY_SOCKET")
    if not path:
        return []
    folder = os.path.dirname(path)
    return [
        attempt("list:proxy-folder", lambda: sorted(os.listdir(folder))),
        attempt("write:proxy-folder", lambda: write_file(folder)),
        attempt("remove:proxy-socket", lambda: os.unlink(path)),  # to bind a socket of its own there
        attempt("proxy:GET /run", lambda: unix_http_get(path, "/run")),
    ]


def report(mode: str, results: list[Result], **extra: Any) -> None:
    body = {"mode": mode, "results": results, **extra}
    line = json.dumps(body)
    print(REPORT_PREFIX + line, flush=True)
    out = os.environ.get("OUTPUT_FILE")
    if out:
        try:
            with open(out, "w") as f:
                f.write(line)
        except OSError as exc:
            print(f"cannot write OUTPUT_FILE: {exc}", file=sys.stderr)


def probes() -> None:
    targets = json.loads(os.environ.get("HOSTILE_TARGETS", "{}"))
    results = network_probes(targets) + filesystem_probes(targets) + privilege_probes() + proxy_probe()
    report("probes", results)


def forkbomb() -> None:
    """Fork until the kernel says no, hold the children a moment (the test checks the host), then stop."""
    hold_s = float(os.environ.get("HOLD_S", "3"))
    children: list[int] = []
    error = None
    while len(children) < 100_000:
        try:
            pid = os.fork()
        except OSError as exc:
            error = f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror}"
            break
        if pid == 0:
            time.sleep(hold_s + 30)
            os._exit(0)
        children.append(pid)
    print(f"PIDS-LIMIT-REACHED {len(children)}", flush=True)
    time.sleep(hold_s)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    report(
        "forkbomb",
        [{"name": "fork", "ok": error is None, "detail": error, "elapsed_s": 0}],
        children=len(children),
    )


def membomb() -> None:
    """Allocate and touch memory in 16 MiB steps until the kernel kills us."""
    hoard = []
    while True:
        hoard.append(bytearray(16 * 1024 * 1024))
        hoard[-1][::4096] = b"x" * len(hoard[-1][::4096])
        print(f"allocated {len(hoard) * 16} MiB", flush=True)


def output_symlink() -> None:
    """Leave OUTPUT_FILE as a link to a path on the HOST (the node's key), hoping the agent follows it."""
    os.symlink(os.environ["SYMLINK_TARGET"], os.environ["OUTPUT_FILE"])
    # ... and the name the agent writes next, hoping it overwrites the host file through the link.
    os.symlink(os.environ["SYMLINK_TARGET"], os.environ["OUTPUT_FILE"] + ".sealed")
    os.mkdir(os.environ["OUTPUT_FILE"] + ".d")
    print("output is now a symlink", flush=True)


def output_fifo() -> None:
    """Leave OUTPUT_FILE as a FIFO: a reader that opens it naively blocks forever."""
    os.mkfifo(os.environ["OUTPUT_FILE"])
    print("output is now a fifo", flush=True)


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "probes"
    modes = {"probes": probes, "forkbomb": forkbomb, "membomb": membomb}
    modes |= {"output-symlink": output_symlink, "output-fifo": output_fifo}
    modes[mode]()


if __name__ == "__main__":
    main()
