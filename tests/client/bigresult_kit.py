"""For end-to-end tests of large results: a researcher's `results(task, to=DIR)` in a child process of its
own, so its peak RSS is that of the client alone (not of the test's server or nodes).

    found = results_to_files(server_url, token, key_file, task_id, folder)
    found.files        # the result files, in organization order
    found.peak_rss_mib # the child's peak resident memory

Run it from a thread (`asyncio.to_thread`) when the server lives on the test's own event loop. The child
runs in its own process group, killed whole when it outlives `timeout_s`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.node.bigresult_kit import peak_rss_mib, reset_peak_rss

from vfed.client.client import Client

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class StreamedResults:
    files: list[Path]
    peak_rss_mib: float


def results_to_files(
    url: str,
    token: str,
    key_file: Path,
    task_id: int,
    folder: Path,
    *,
    ca_file: Path | None = None,
    timeout_s: float = 3600,
) -> StreamedResults:
    """Stream every result of `task_id` into `folder` from a child process; AssertionError with the
    child's stderr when it fails."""
    env = {**os.environ, "VFED_TOKEN": token, "VFED_KEY_FILE": str(key_file), "VFED_SERVER_URL": url}
    if ca_file is not None:
        env["VFED_CA_FILE"] = str(ca_file)
    command = [sys.executable, "-m", "tests.client.bigresult_kit", str(task_id), str(folder)]
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    ) as child:
        try:
            out, err = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            raise AssertionError(f"results of task {task_id} not streamed within {timeout_s} s") from None
    assert child.returncode == 0, err.decode(errors="replace")
    report = json.loads(out)
    return StreamedResults([Path(f) for f in report["files"]], float(report["peak_rss_mib"]))


def _main(task_id: int, folder: Path) -> None:
    """The child: the environment names the server, token and key, as for the `vfed` CLI. Its peak is
    measured from its start: the high-water mark a child inherits holds its parent's pages at the fork
    (a test process of a gigabyte made this child look as big), so it is reset first."""
    reset_peak_rss(os.getpid())
    with Client() as client:
        found = client.results(task_id, to=folder)
    files = [str(r.file) for r in found.organizations if r.file is not None]
    print(json.dumps({"files": files, "peak_rss_mib": peak_rss_mib(os.getpid())}))


if __name__ == "__main__":
    _main(int(sys.argv[1]), Path(sys.argv[2]))
