"""What a test Fabric network is made from: crypto layout, configtx.yaml, core.yaml, process settings and
connection profiles.

Everything is plain data derived from the organizations and their loopback ports, so the network module only
starts processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ORDERER_DOMAIN = "example.com"
ORDERER_MSP = "OrdererMSP"
ORDERER_HOST = f"orderer.{ORDERER_DOMAIN}"


@dataclass(frozen=True)
class Identity:
    """A signing identity of an org as a client needs it: MSP id, certificate and private key files."""

    name: str
    msp_id: str
    msp_dir: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Orderer:
    port: int
    admin_port: int
    ops_port: int
    crypto: Path  # crypto/ordererOrganizations/<domain>

    @property
    def node_dir(self) -> Path:
        return self.crypto / "orderers" / ORDERER_HOST

    @property
    def tls_ca(self) -> Path:
        return self.node_dir / "tls" / "ca.crt"

    @property
    def admin_tls(self) -> Path:
        return self.crypto / "users" / f"Admin@{ORDERER_DOMAIN}" / "tls"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Org:
    """A peer organization with one peer (``peer0``), an Admin and one User."""

    index: int
    peer_port: int
    chaincode_port: int
    ops_port: int
    crypto_root: Path  # <work>/crypto

    @property
    def name(self) -> str:
        return f"org{self.index}"

    @property
    def msp_id(self) -> str:
        return f"Org{self.index}MSP"

    @property
    def domain(self) -> str:
        return f"{self.name}.{ORDERER_DOMAIN}"

    @property
    def peer_name(self) -> str:
        return f"peer0.{self.domain}"

    @property
    def crypto(self) -> Path:
        return self.crypto_root / "peerOrganizations" / self.domain

    @property
    def peer_dir(self) -> Path:
        return self.crypto / "peers" / self.peer_name

    @property
    def tls_ca(self) -> Path:
        return self.peer_dir / "tls" / "ca.crt"

    @property
    def peer_address(self) -> str:
        return f"127.0.0.1:{self.peer_port}"

    def identity(self, user: str) -> Identity:
        """``user`` is ``Admin`` or ``User1`` (cryptogen's names)."""
        name = f"{user}@{self.domain}"
        msp = self.crypto / "users" / name / "msp"
        return Identity(
            name, self.msp_id, msp, msp / "signcerts" / f"{name}-cert.pem", msp / "keystore" / "priv_sk"
        )


def crypto_config(orgs: list[Org]) -> str:
    loopback = ["localhost", "127.0.0.1"]
    doc = {
        "OrdererOrgs": [
            {
                "Name": "Orderer",
                "Domain": ORDERER_DOMAIN,
                "EnableNodeOUs": True,
                "Specs": [{"Hostname": "orderer", "SANS": loopback}],
            }
        ],
        "PeerOrgs": [
            {
                "Name": f"Org{o.index}",
                "Domain": o.domain,
                "EnableNodeOUs": True,
                "Template": {"Count": 1, "SANS": loopback},
                "Users": {"Count": 1},
            }
            for o in orgs
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _org_section(msp_id: str, msp_dir: Path, writers: str) -> dict[str, Any]:
    def sig(rule: str) -> dict[str, str]:
        return {"Type": "Signature", "Rule": rule}

    roles = ", ".join(f"'{msp_id}.{r}'" for r in ("admin", "peer", "client", "orderer"))
    return {
        "Name": msp_id,
        "ID": msp_id,
        "MSPDir": str(msp_dir),
        "Policies": {
            "Readers": sig(f"OR({roles})"),
            "Writers": sig(f"OR({writers})"),
            "Admins": sig(f"OR('{msp_id}.admin')"),
            "Endorsement": sig(f"OR('{msp_id}.peer')"),
        },
    }


def configtx(orderer: Orderer, orgs: list[Org]) -> str:
    """One application channel profile: etcdraft with one consenter, MAJORITY endorsement for chaincode
    transactions and for chaincode lifecycle (definitions need most orgs' approval)."""

    def meta(rule: str) -> dict[str, str]:
        return {"Type": "ImplicitMeta", "Rule": rule}

    base_policies = {
        "Readers": meta("ANY Readers"),
        "Writers": meta("ANY Writers"),
        "Admins": meta("MAJORITY Admins"),
    }
    ord_org = _org_section(
        ORDERER_MSP,
        orderer.crypto / "msp",
        f"'{ORDERER_MSP}.admin', '{ORDERER_MSP}.client', '{ORDERER_MSP}.orderer'",
    )
    ord_org["OrdererEndpoints"] = [orderer.address]
    peer_orgs = [
        _org_section(
            o.msp_id, o.crypto / "msp", f"'{o.msp_id}.admin', '{o.msp_id}.client', '{o.msp_id}.orderer'"
        )
        for o in orgs
    ]
    server_crt = str(orderer.node_dir / "tls" / "server.crt")
    profile = {
        "Policies": base_policies,
        "Capabilities": {"V2_0": True},
        "Orderer": {
            "OrdererType": "etcdraft",
            "BatchTimeout": "100ms",
            "BatchSize": {"MaxMessageCount": 10, "AbsoluteMaxBytes": "99 MB", "PreferredMaxBytes": "512 KB"},
            "EtcdRaft": {
                "Consenters": [
                    {
                        "Host": "127.0.0.1",
                        "Port": orderer.port,
                        "ClientTLSCert": server_crt,
                        "ServerTLSCert": server_crt,
                    }
                ]
            },
            "Organizations": [ord_org],
            "Policies": {**base_policies, "BlockValidation": meta("ANY Writers")},
            "Capabilities": {"V2_0": True},
        },
        "Application": {
            "Organizations": peer_orgs,
            "Policies": {
                **base_policies,
                "LifecycleEndorsement": meta("MAJORITY Endorsement"),
                "Endorsement": meta("MAJORITY Endorsement"),
            },
            "Capabilities": {"V2_5": True},
        },
    }
    return yaml.safe_dump({"Profiles": {"AppChannel": profile}}, sort_keys=False)


def core_yaml_without_docker(sample: str) -> str:
    """The sample core.yaml with ``vm.endpoint`` emptied: there is no Docker here, and with the socket
    configured the peer's /healthz answers 503. An empty CORE_VM_ENDPOINT is ignored: it must be the file."""
    line = "    endpoint: unix:///var/run/docker.sock\n"
    if sample.count(line) != 1:
        raise ValueError("core.yaml: vm.endpoint line not found; the sample config changed")
    return sample.replace(line, '    endpoint: ""\n')


def connection_profile(me: Org, orgs: list[Org], orderer: Orderer, channel: str) -> dict[str, Any]:
    """A Fabric common connection profile for a client of ``me``: every org's peer (endorsement needs a
    majority), the orderer and the channel."""
    return {
        "name": f"vfed-test-{me.name}",
        "version": "1.0.0",
        "client": {"organization": me.msp_id.removesuffix("MSP")},
        "organizations": {
            o.msp_id.removesuffix("MSP"): {"mspid": o.msp_id, "peers": [o.peer_name]} for o in orgs
        },
        "peers": {
            o.peer_name: {
                "url": f"grpcs://{o.peer_address}",
                "tlsCACerts": {"path": str(o.tls_ca)},
                "grpcOptions": {"ssl-target-name-override": o.peer_name},
            }
            for o in orgs
        },
        "orderers": {
            ORDERER_HOST: {
                "url": f"grpcs://{orderer.address}",
                "tlsCACerts": {"path": str(orderer.tls_ca)},
                "grpcOptions": {"ssl-target-name-override": ORDERER_HOST},
            }
        },
        "channels": {
            channel: {
                "orderers": [ORDERER_HOST],
                "peers": {
                    o.peer_name: {
                        "endorsingPeer": True,
                        "chaincodeQuery": True,
                        "ledgerQuery": True,
                        "eventSource": True,
                    }
                    for o in orgs
                },
            }
        },
    }


def identity_document(identity: Identity) -> str:
    return json.dumps(
        {
            "name": identity.name,
            "mspid": identity.msp_id,
            "cert": str(identity.cert),
            "key": str(identity.key),
        },
        indent=2,
    )


def orderer_settings(o: Orderer, data: Path) -> dict[str, str]:
    """The orderer on loopback: TLS, channel participation API (no system channel), metrics for readiness."""
    node = o.node_dir
    key, crt = str(node / "tls" / "server.key"), str(node / "tls" / "server.crt")
    return {
        "ORDERER_GENERAL_LISTENADDRESS": "127.0.0.1",
        "ORDERER_GENERAL_LISTENPORT": str(o.port),
        "ORDERER_GENERAL_LOCALMSPID": ORDERER_MSP,
        "ORDERER_GENERAL_LOCALMSPDIR": str(node / "msp"),
        "ORDERER_GENERAL_TLS_ENABLED": "true",
        "ORDERER_GENERAL_TLS_PRIVATEKEY": key,
        "ORDERER_GENERAL_TLS_CERTIFICATE": crt,
        "ORDERER_GENERAL_TLS_ROOTCAS": f"[{o.tls_ca}]",
        "ORDERER_GENERAL_BOOTSTRAPMETHOD": "none",
        "ORDERER_CHANNELPARTICIPATION_ENABLED": "true",
        "ORDERER_FILELEDGER_LOCATION": str(data),
        "ORDERER_CONSENSUS_WALDIR": str(data / "etcdraft" / "wal"),
        "ORDERER_CONSENSUS_SNAPDIR": str(data / "etcdraft" / "snapshot"),
        "ORDERER_OPERATIONS_LISTENADDRESS": f"127.0.0.1:{o.ops_port}",
        "ORDERER_METRICS_PROVIDER": "prometheus",
        "ORDERER_ADMIN_LISTENADDRESS": f"127.0.0.1:{o.admin_port}",
        "ORDERER_ADMIN_TLS_ENABLED": "true",
        "ORDERER_ADMIN_TLS_PRIVATEKEY": key,
        "ORDERER_ADMIN_TLS_CERTIFICATE": crt,
        "ORDERER_ADMIN_TLS_CLIENTAUTHREQUIRED": "true",
        "ORDERER_ADMIN_TLS_CLIENTROOTCAS": f"[{o.tls_ca}]",
    }


def peer_settings(org: Org, data: Path, ccaas_builder: Path) -> dict[str, str]:
    """A peer on loopback that gossips only with itself (every peer pulls blocks from the orderer) and
    builds chaincode only as a service."""
    d = org.peer_dir
    return {
        "CORE_PEER_ID": org.peer_name,
        "CORE_PEER_LOCALMSPID": org.msp_id,
        "CORE_PEER_MSPCONFIGPATH": str(d / "msp"),
        "CORE_PEER_LISTENADDRESS": org.peer_address,
        "CORE_PEER_ADDRESS": org.peer_address,
        "CORE_PEER_CHAINCODELISTENADDRESS": f"127.0.0.1:{org.chaincode_port}",
        "CORE_PEER_CHAINCODEADDRESS": f"127.0.0.1:{org.chaincode_port}",
        "CORE_PEER_GOSSIP_BOOTSTRAP": org.peer_address,
        "CORE_PEER_GOSSIP_EXTERNALENDPOINT": org.peer_address,
        "CORE_PEER_TLS_ENABLED": "true",
        "CORE_PEER_TLS_CERT_FILE": str(d / "tls" / "server.crt"),
        "CORE_PEER_TLS_KEY_FILE": str(d / "tls" / "server.key"),
        "CORE_PEER_TLS_ROOTCERT_FILE": str(org.tls_ca),
        "CORE_PEER_FILESYSTEMPATH": str(data),
        "CORE_LEDGER_SNAPSHOTS_ROOTDIR": str(data / "snapshots"),
        "CORE_OPERATIONS_LISTENADDRESS": f"127.0.0.1:{org.ops_port}",
        "CORE_CHAINCODE_EXTERNALBUILDERS": f"[{{name: ccaas_builder, path: {ccaas_builder}}}]",
    }


def peer_client_settings(org: Org, identity: Identity) -> dict[str, str]:
    """The ``peer`` CLI acting as ``identity`` against the org's own peer."""
    return {
        "CORE_PEER_LOCALMSPID": org.msp_id,
        "CORE_PEER_MSPCONFIGPATH": str(identity.msp_dir),
        "CORE_PEER_ADDRESS": org.peer_address,
        "CORE_PEER_TLS_ENABLED": "true",
        "CORE_PEER_TLS_ROOTCERT_FILE": str(org.tls_ca),
    }
