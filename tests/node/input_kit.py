"""A big run input decrypted as the node does it (vfed.node.run_input), in a process of its own so its peak
memory is its own: tests/node/test_node_input_stream.py.

    python -m tests.node.input_kit '<json>'   (the sealed file, the node's key, the sender, the context)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.node.bigresult_kit import peak_rss_mib, reset_peak_rss

from vfed.common.crypto import Keyring, OrgKey, PublicKey
from vfed.node.input_header import LargeValue
from vfed.node.run_input import SealedInput, decrypt_sealed


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main(spec: dict[str, Any]) -> dict[str, Any]:
    key = OrgKey(bytes.fromhex(spec["x25519"]), bytes.fromhex(spec["ed25519"]))
    sender = PublicKey.from_text(spec["sender"])
    path = Path(spec["sealed"])
    sealed = SealedInput(path=path, size=path.stat().st_size)
    reset_peak_rss(os.getpid())  # the peak from here on: what decrypting and reading the header take
    before = _rss_mib()
    run_input = decrypt_sealed(sealed, Keyring([key]), sender, bytes.fromhex(spec["context"]))
    header = asyncio.run(run_input.header())
    return {
        "growth_mib": peak_rss_mib(os.getpid()) - before,
        "size": run_input.size,
        "method": header.method,
        "epsilon": header.kwargs["epsilon"],
        "large": isinstance(header.kwargs["data"], LargeValue),
        "sealed_left": path.exists(),
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
