"""What a Fabric ledger is configured with (`FabricSettings`: the node's `ledger.fabric`, the client's
`fabric_ledgers`) and what this project reads of a Fabric common connection profile. No hfc here: the
settings load and validate without the `fabric` extra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vfed.common.ledger.errors import LedgerError

DEFAULT_CHAINCODE = "vfed-ledger"


class FabricUnavailable(LedgerError):
    """The Fabric network (peers, orderer) could not be reached or did not answer in time."""


class FabricSettings(BaseModel):
    """Where the collaboration's Fabric channel is and who this organization is on it."""

    model_config = ConfigDict(extra="forbid")

    connection_profile: Path = Field(description="a Fabric common connection profile (JSON or YAML)")
    channel: str = Field(min_length=1, max_length=249, description="the collaboration's channel")
    chaincode: str = Field(default=DEFAULT_CHAINCODE, min_length=1, description="the ledger chaincode's name")
    msp_id: str = Field(min_length=1, description="this organization's MSP id")
    certificate: Path = Field(description="the Fabric identity's X.509 certificate (PEM)")
    private_key: Path = Field(description="the Fabric identity's private key (PEM)")
    endorsing_peers: list[str] | None = Field(
        default=None,
        description="peers (names in the profile) that endorse appends; default: every endorsing peer of the "
        "channel in the profile",
    )
    query_peer: str | None = Field(
        default=None, description="the peer reads go to; default: the first peer of this organization"
    )
    timeout_s: float = Field(default=30.0, gt=0, description="how long to wait for endorsement and commit")


class Profile:
    """What this module needs of a connection profile: peers and orderers with address, TLS CA and the TLS
    host name, and which peers endorse on the channel."""

    def __init__(self, settings: FabricSettings) -> None:
        path = settings.connection_profile
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise FabricUnavailable(f"cannot read the Fabric connection profile {path}: {exc}") from None
        try:
            raw: Any = json.loads(text)
        except ValueError:
            import yaml

            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise FabricUnavailable(f"{path} is neither JSON nor YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise FabricUnavailable(f"{path} is not a connection profile (no object at its top)")
        self.path = path
        self.peers = self._nodes(raw, "peers")
        self.orderers = self._nodes(raw, "orderers")
        if not self.orderers:
            raise FabricUnavailable(f"{path} names no orderer")
        channel = (raw.get("channels") or {}).get(settings.channel)
        if not isinstance(channel, dict):
            raise FabricUnavailable(f"{path} has no channel {settings.channel!r}")
        listed = channel.get("peers") or {}
        self.endorsers = [
            name
            for name, roles in listed.items()
            if not isinstance(roles, dict) or roles.get("endorsingPeer", True)
        ]
        if isinstance(channel.get("orderers"), list) and channel["orderers"]:
            self.orderers = {n: self.orderers[n] for n in channel["orderers"] if n in self.orderers}
        own_org = (raw.get("client") or {}).get("organization")
        orgs = raw.get("organizations") or {}
        mine = [org for org in orgs.values() if isinstance(org, dict) and org.get("mspid") == settings.msp_id]
        if own_org in orgs and isinstance(orgs[own_org], dict):
            mine.insert(0, orgs[own_org])
        self.own_peers = [p for org in mine for p in (org.get("peers") or []) if p in self.peers]
        for name in [*self.endorsers, *self.own_peers]:
            if name not in self.peers:
                raise FabricUnavailable(
                    f"{path}: channel {settings.channel!r} names peer {name!r}, not defined"
                )

    def _nodes(self, raw: dict[str, Any], section: str) -> dict[str, tuple[str, str | None, str | None]]:
        """name -> (host:port, TLS CA file, TLS host name override)."""
        out: dict[str, tuple[str, str | None, str | None]] = {}
        for name, node in (raw.get(section) or {}).items():
            if not isinstance(node, dict) or not isinstance(node.get("url"), str):
                raise FabricUnavailable(f"{self.path}: {section[:-1]} {name!r} has no url")
            url: str = node["url"]
            scheme, _, address = url.partition("://")
            if not address:
                scheme, address = "grpc", url
            tls = node.get("tlsCACerts") or {}
            ca = tls.get("path") if isinstance(tls, dict) else None
            if scheme == "grpcs" and not ca:
                raise FabricUnavailable(
                    f"{self.path}: {section[:-1]} {name!r} uses TLS but names no tlsCACerts.path"
                )
            options = node.get("grpcOptions") or {}
            host = options.get("ssl-target-name-override") or options.get("grpc.ssl_target_name_override")
            out[str(name)] = (address, str(ca) if scheme == "grpcs" else None, host)
        return out
