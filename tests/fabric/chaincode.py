"""Chaincode-as-a-service for the test network: npm dependencies, per-org packages, and the servers.

Each org's package names that org's own chaincode server, so orgs may run different code: how tests show that
a peer running chaincode that skips checks cannot get its result committed on its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.fabric.procs import FabricError, clean_env, log_tail

NPM_CACHE = Path.home() / ".cache" / "vfed-npm"
_STAMP = ".vfed-package-lock.sha256"
SERVER_BIN = Path("node_modules") / ".bin" / "fabric-chaincode-node"


@contextmanager
def _locked(key: str) -> Iterator[None]:
    """Serialize installs of one chaincode directory across test processes sharing this machine."""
    locks = NPM_CACHE / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_node_modules(source: Path, logdir: Path, timeout_s: float = 300.0) -> None:
    """``npm ci`` the chaincode package unless its node_modules already matches package-lock.json.

    The match is a stamp holding the lock file's hash, written only after a successful install, so an
    interrupted install is redone.
    """
    source = source.resolve()
    lock = source / "package-lock.json"
    if not lock.is_file():
        raise FabricError(f"chaincode {source}: no package-lock.json (run `npm install` there once)")
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    stamp = source / "node_modules" / _STAMP
    with _locked(str(source)):
        if stamp.is_file() and stamp.read_text().strip() == digest and (source / SERVER_BIN).exists():
            return
        log = logdir / f"npm-ci-{source.name}.log"
        argv = ["npm", "ci", "--prefer-offline", "--ignore-scripts", "--no-audit", "--no-fund"]
        with log.open("ab") as out:
            try:
                done = subprocess.run(
                    argv,
                    cwd=source,
                    env=clean_env({"npm_config_cache": str(NPM_CACHE)}),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout_s,
                    check=False,
                )
            except FileNotFoundError as exc:
                raise FabricError("npm is not installed; chaincode servers need Node.js and npm") from exc
        if done.returncode != 0:
            raise FabricError(f"npm ci in {source} failed (exit {done.returncode}):\n{log_tail(log)}")
        if not (source / SERVER_BIN).exists():
            raise FabricError(
                f"chaincode {source}: no {SERVER_BIN} after npm ci (does it depend on fabric-shim?)"
            )
        stamp.write_text(digest + "\n")


def write_package(dest: Path, label: str, server_address: str) -> Path:
    """A ccaas package: the peer reads only metadata.json and connection.json; the server is ours to run."""
    dest.mkdir(parents=True, exist_ok=True)
    connection = {"address": server_address, "dial_timeout": "10s", "tls_required": False}
    metadata = {"type": "ccaas", "label": label}
    code = _targz({"connection.json": json.dumps(connection).encode()})
    package = dest / f"{label}.tgz"
    package.write_bytes(_targz({"metadata.json": json.dumps(metadata).encode(), "code.tar.gz": code}))
    return package


def _targz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def server_argv(source: Path, address: str, package_id: str) -> list[str]:
    return [
        str(source.resolve() / SERVER_BIN),
        "server",
        "--chaincode-address",
        address,
        "--chaincode-id",
        package_id,
    ]


def server_env(msp_id: str) -> dict[str, str]:
    """fabric-shim's server mode takes its address and id as flags; ``ctx.stub.getMspID()`` reads the MSP id
    from CORE_PEER_LOCALMSPID."""
    return clean_env({"CORE_PEER_LOCALMSPID": msp_id, "CORE_CHAINCODE_LOGGING_LEVEL": "info"})
