"""The Fabric network fixture on real binaries: orgs up, majority endorsement enforced by the peers, upgrades
that keep state, and nothing left running once the network stops."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import psutil
import pytest

from tests.fabric.conftest import require_fabric
from tests.fabric.network import ChaincodeDeployError, FabricNetwork, UnknownOrg
from tests.fabric.procs import (
    FabricError,
    FabricStartError,
    PeerCommandError,
    Server,
    TransactionInvalid,
    free_ports,
)

pytestmark = pytest.mark.fabric

HERE = Path(__file__).parent
HONEST = HERE / "kvcc"
DISHONEST = HERE / "kvcc_dishonest"
ORGS = ("org1", "org2", "org3")


@pytest.fixture(scope="module")
def kv(fabric_network: FabricNetwork) -> FabricNetwork:
    """Chaincode ``kv``: org1 and org2 run the honest code, org3 a version that skips checks and forges."""
    fabric_network.deploy_chaincode(
        "kv",
        "1.0",
        1,
        {"org1": HONEST, "org2": HONEST, "org3": DISHONEST},
        init_args=["init", "genesis", "0"],
    )
    return fabric_network


def _key() -> str:
    return f"k-{uuid.uuid4().hex[:8]}"


def _absent_everywhere(net: FabricNetwork, key: str) -> None:
    for org in ORGS:
        with pytest.raises(PeerCommandError, match="no such key"):
            net.query(org, "get", [key], chaincode="kv")


def test_three_orgs_share_the_channel_and_get_profiles(fabric_network: FabricNetwork) -> None:
    net = fabric_network
    heights = {org: net.height(org) for org in ORGS}
    assert min(heights.values()) >= 1
    for org in ORGS:
        profile = json.loads(net.profile_path(org).read_text())
        assert profile["client"]["organization"] == org.capitalize()
        assert {o["mspid"] for o in profile["organizations"].values()} == {"Org1MSP", "Org2MSP", "Org3MSP"}
        for peer in (*profile["peers"].values(), *profile["orderers"].values()):
            host, port = peer["url"].removeprefix("grpcs://").split(":")
            assert host == "127.0.0.1"
            socket.create_connection((host, int(port)), timeout=2).close()
            assert "BEGIN CERTIFICATE" in Path(peer["tlsCACerts"]["path"]).read_text()
        assert set(profile["channels"]["vfed"]["peers"]) == set(profile["peers"])
        identity = json.loads((net.profile_path(org).parent / "identity.json").read_text())
        assert identity["mspid"] == f"Org{org[-1]}MSP"
        assert identity["cert"] == str(net.identity(org).cert)
        assert "BEGIN CERTIFICATE" in Path(identity["cert"]).read_text()
        assert "PRIVATE KEY" in Path(identity["key"]).read_text()


def test_each_peer_talks_to_its_own_org_server(kv: FabricNetwork) -> None:
    for org in ORGS:
        assert kv.query(org, "servedBy", [], chaincode="kv") == f"Org{org[-1]}MSP"
    assert kv.query("org2", "get", ["genesis"], chaincode="kv") == "0"  # the init invoke ran


def test_majority_endorsed_write_is_committed_on_every_peer(kv: FabricNetwork) -> None:
    key = _key()
    assert kv.invoke(
        "org1", "put", [key, 'say "hi"\n€'], chaincode="kv", endorsing_orgs=["org1", "org2"]
    ) == ('say "hi"\n€')
    for org in ORGS:
        assert kv.query(org, "get", [key], chaincode="kv") == 'say "hi"\n€'


def test_one_org_alone_cannot_commit(kv: FabricNetwork) -> None:
    key = _key()
    with pytest.raises(TransactionInvalid) as err:
        kv.invoke("org1", "put", [key, "1"], chaincode="kv", endorsing_orgs=["org1"])
    assert err.value.status == "ENDORSEMENT_POLICY_FAILURE"
    _absent_everywhere(kv, key)


def test_dishonest_org_cannot_commit_what_honest_chaincode_refuses(kv: FabricNetwork) -> None:
    key = _key()
    # The dishonest peer endorses; the transaction is ordered, and every peer rejects it at validation.
    with pytest.raises(TransactionInvalid) as err:
        kv.invoke("org3", "checkedPut", [key, "-5"], chaincode="kv", endorsing_orgs=["org3"])
    assert err.value.status == "ENDORSEMENT_POLICY_FAILURE"
    # An honest peer refuses to endorse at all, with the chaincode's reason.
    with pytest.raises(PeerCommandError, match="refused") as refused:
        kv.invoke("org3", "checkedPut", [key, "-5"], chaincode="kv", endorsing_orgs=["org3", "org1"])
    assert not isinstance(refused.value, TransactionInvalid)
    _absent_everywhere(kv, key)
    assert kv.invoke("org1", "checkedPut", [key, "5"], chaincode="kv", endorsing_orgs=["org1", "org2"]) == "5"
    assert kv.query("org3", "get", [key], chaincode="kv") == "5"


def test_endorsement_mismatch_is_not_committed_and_honest_majority_is(kv: FabricNetwork) -> None:
    key = _key()
    with pytest.raises(PeerCommandError, match="do not match") as err:
        kv.invoke("org2", "put", [key, "7"], chaincode="kv", endorsing_orgs=["org2", "org3"])
    assert not isinstance(err.value, TransactionInvalid)
    _absent_everywhere(kv, key)
    assert kv.invoke("org2", "put", [key, "7"], chaincode="kv", endorsing_orgs=["org1", "org2"]) == "7"
    assert kv.query("org3", "get", [key], chaincode="kv") == "7"


def test_upgrade_to_sequence_2_keeps_state_and_replaces_servers(fabric_network: FabricNetwork) -> None:
    net = fabric_network
    honest = dict.fromkeys(ORGS, HONEST)
    first = net.deploy_chaincode("kvup", "1.0", 1, honest)
    net.invoke("org1", "put", ["kept", "v1"], chaincode="kvup")
    old = {s.pid: psutil.Process(s.pid).create_time() for s in first.servers.values()}
    second = net.deploy_chaincode("kvup", "2.0", 2, honest, init_args=["init", "upgraded", "yes"])
    assert second.package_ids != first.package_ids
    for pid, created in old.items():
        assert not (psutil.pid_exists(pid) and psutil.Process(pid).create_time() == created)
    for org in ORGS:
        assert net.query(org, "get", ["kept"], chaincode="kvup") == "v1"
        assert net.query(org, "get", ["upgraded"], chaincode="kvup") == "yes"
    assert net.invoke("org3", "put", ["after", "v2"], chaincode="kvup") == "v2"


def test_bad_requests_are_typed_errors(kv: FabricNetwork, tmp_path: Path) -> None:
    with pytest.raises(UnknownOrg, match="org9"):
        kv.query("org9", "get", ["x"], chaincode="kv")
    with pytest.raises(UnknownOrg):
        kv.invoke("org1", "put", ["x", "1"], chaincode="kv", endorsing_orgs=["org1", "nobody"])
    with pytest.raises(PeerCommandError) as err:
        kv.query("org1", "noSuchFunction", [], chaincode="kv")
    assert "noSuchFunction" in err.value.message
    with pytest.raises(PeerCommandError):
        kv.query("org1", "get", ["x"], chaincode="not-deployed")
    with pytest.raises(UnknownOrg, match="missing"):
        kv.deploy_chaincode("kv2", "1.0", 1, {"org1": HONEST})
    with pytest.raises(FabricError, match=r"package-lock\.json"):
        kv.deploy_chaincode("kv2", "1.0", 1, dict.fromkeys(ORGS, tmp_path))


def test_failed_lifecycle_step_reports_logs_and_stops_its_servers(kv: FabricNetwork) -> None:
    running = set(kv.pids())
    with pytest.raises(ChaincodeDeployError, match="sequence") as err:
        kv.deploy_chaincode("kv", "9.0", 5, dict.fromkeys(ORGS, HONEST))  # sequence 2 is the only next one
    assert "--- end of" in str(err.value)
    assert set(kv.pids()) == running
    assert kv.deployments["kv"].sequence == 1
    assert kv.query("org1", "get", ["genesis"], chaincode="kv") == "0"


def test_process_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    server = Server.spawn(
        "doomed", ["sh", "-c", "echo cannot bind; exit 3"], {}, tmp_path / "doomed.log", tmp_path
    )
    try:
        with pytest.raises(FabricStartError, match=r"(?s)exited with code 3.*cannot bind"):
            server.wait_ready([free_ports(1)[0]], None, 10)
    finally:
        server.stop()


def test_missing_binaries_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FabricStartError, match="missing or not executable"), FabricNetwork(fabric=tmp_path):
        pass


def test_stopped_network_leaves_no_process_port_or_directory() -> None:
    require_fabric()
    with FabricNetwork(orgs=2, channel="leakcheck") as net:
        net.deploy_chaincode("kv", "1.0", 1, {"org1": HONEST, "org2": DISHONEST})
        assert net.invoke("org1", "checkedPut", ["a", "1"], chaincode="kv") == "1"
        procs = []
        for pid in net.pids():
            top = psutil.Process(pid)
            procs += [top, *top.children(recursive=True)]
        names = {p.name() for p in procs}
        ports, workdir = net.ports(), net.workdir
        assert {"orderer", "peer"} <= names and any(n.startswith("node") for n in names), names
        assert len(procs) >= 5
    for proc in procs:
        assert not proc.is_running(), f"{proc} survived the network"
    for port in ports:
        with socket.socket() as s:
            # SO_REUSEADDR lets the bind past connections in TIME_WAIT, never past a listener.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    assert not workdir.exists()
