"""The Fabric network shared by the tests under tests/fabric: started once per session (a few seconds)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests import infra
from tests.fabric.network import FABRIC_DIR_ENV, FabricNetwork, fabric_dir, missing_binaries


def require_fabric() -> None:
    """Skip, or fail under ``make test`` (VFED_REQUIRE_COMPONENTS=1), without the binaries or Node.js."""
    why = missing_binaries(fabric_dir())
    if why is not None:
        infra.missing("hyperledger fabric", f"{why} (set {FABRIC_DIR_ENV} to a Fabric 2.5 build)")
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            infra.missing("node.js", f"no {tool} on PATH: chaincode servers need Node.js and npm")


@pytest.fixture(scope="session")
def fabric_network() -> Iterator[FabricNetwork]:
    """Three orgs, one peer each, joined to channel ``vfed``; tests deploy chaincodes under own names."""
    require_fabric()
    with FabricNetwork(orgs=3) as net:
        yield net
