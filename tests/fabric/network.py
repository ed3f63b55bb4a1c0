"""A real Hyperledger Fabric network on loopback for tests: one etcdraft orderer, one peer per org, no Docker.

``with FabricNetwork(orgs=3) as net:`` generates crypto, the channel and the processes in a fresh directory
and removes all of it on exit (kept when VFED_FABRIC_KEEP=1, for a post-mortem of the logs in it);
``deploy_chaincode`` runs chaincode-as-a-service servers per org, and ``invoke``/``query`` go through the
``peer`` CLI. Every process runs in its own session and is stopped by process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.fabric import chaincode, config
from tests.fabric.config import Identity, Orderer, Org
from tests.fabric.procs import (
    Cli,
    CliResult,
    FabricError,
    FabricStartError,
    PeerCommandError,
    Server,
    channel_height,
    clean_env,
    free_ports,
    installed_package_id,
    invoke_payload,
    log_tail,
    run,
    run_all,
    stop_all,
)

FABRIC_DIR_ENV = "VFED_FABRIC_DIR"
KEEP_ENV = "VFED_FABRIC_KEEP"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 30.0


def fabric_dir() -> Path:
    """Binaries from $VFED_FABRIC_DIR, else the shared build next to the project checkout."""
    return Path(os.environ.get(FABRIC_DIR_ENV) or PROJECT_ROOT.parent / "shared" / "fabric")


def missing_binaries(directory: Path) -> str | None:
    """Why the Fabric build in ``directory`` cannot be used, or None when it can."""
    if not directory.is_dir():
        return f"no directory {directory}"
    needed = [directory / "bin" / n for n in ("peer", "orderer", "configtxgen", "cryptogen", "osnadmin")]
    needed += [directory / "ccaas_builder" / "bin" / n for n in ("detect", "build", "release")]
    absent = [str(p) for p in needed if not os.access(p, os.X_OK)]
    if not (directory / "config" / "core.yaml").is_file():
        absent.append(str(directory / "config" / "core.yaml"))
    return f"missing or not executable: {', '.join(absent)}" if absent else None


class UnknownOrg(FabricError, LookupError):
    """An org name that is not part of this network."""


class ChaincodeDeployError(FabricError):
    """A lifecycle step failed; the message ends with the chaincode servers' and peers' log tails."""


@dataclass
class Deployment:
    """The committed definition of one chaincode and its servers, one per org (each on its own port)."""

    name: str
    version: str
    sequence: int
    init_required: bool
    package_ids: dict[str, str]
    ports: dict[str, int]
    servers: dict[str, Server] = field(default_factory=dict)


class FabricNetwork:
    """One orderer and ``orgs`` peer orgs (``org1``..``orgN``, MSP ids ``Org1MSP``..), all joined to
    ``channel``. Chaincode endorsement and lifecycle both need a MAJORITY of the orgs."""

    def __init__(self, orgs: int = 3, channel: str = "vfed", fabric: Path | None = None) -> None:
        if orgs < 1:
            raise ValueError("a network needs at least one peer org")
        self.n_orgs = orgs
        self.channel = channel
        self.fabric = (fabric or fabric_dir()).resolve()
        self.workdir = Path()
        self.orgs: list[Org] = []
        self.deployments: dict[str, Deployment] = {}
        self._orderer: Orderer | None = None
        self._servers: list[Server] = []

    # --- lifecycle -----------------------------------------------------------------------------------------

    def __enter__(self) -> FabricNetwork:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        why = missing_binaries(self.fabric)
        if why is not None:
            raise FabricStartError(f"Fabric binaries in {self.fabric}: {why}")
        self.workdir = Path(tempfile.mkdtemp(prefix="vfed-fabric-"))
        try:
            self._start()
        except FabricStartError:
            self.stop()
            raise
        except Exception as exc:  # a CLI step failed: its message alone rarely says why, the servers' logs do
            report = self._log_tails(self._servers)
            self.stop()
            raise FabricStartError(f"Fabric network did not start: {exc}\n{report}") from exc
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop chaincode servers, peers and the orderer (process groups), then remove the work directory."""
        stop_all(list(reversed(self._servers)))
        self._servers.clear()
        self.deployments.clear()
        if self.workdir != Path() and os.environ.get(KEEP_ENV) != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _start(self) -> None:
        w = self.workdir
        for sub in ("logs/cli", "data", "profiles"):
            (w / sub).mkdir(parents=True)
        ports = iter(free_ports(3 + 3 * self.n_orgs))
        o = Orderer(
            next(ports), next(ports), next(ports), w / "crypto" / "ordererOrganizations" / "example.com"
        )
        self._orderer = o
        self.orgs = [
            Org(i, next(ports), next(ports), next(ports), w / "crypto") for i in range(1, self.n_orgs + 1)
        ]
        (w / "crypto-config.yaml").write_text(config.crypto_config(self.orgs))
        (w / "configtx.yaml").write_text(config.configtx(o, self.orgs))
        shutil.copytree(self.fabric / "config", w / "config")
        core = w / "config" / "core.yaml"
        core.write_text(config.core_yaml_without_docker(core.read_text()))
        block = w / f"{self.channel}.block"
        self._tool(
            "cryptogen", "generate", f"--config={w / 'crypto-config.yaml'}", f"--output={w / 'crypto'}"
        )
        genesis = ["-profile", "AppChannel", "-channelID", self.channel, "-outputBlock", str(block)]
        self._tool("configtxgen", "-configPath", str(w), *genesis)
        orderer = self._serve("orderer", ["orderer"], config.orderer_settings(o, w / "data" / "orderer"))
        peers = [
            self._serve(
                f"peer-{org.name}",
                ["peer", "node", "start"],
                config.peer_settings(org, w / "data" / org.name, self.fabric / "ccaas_builder"),
            )
            for org in self.orgs
        ]
        orderer.wait_ready([o.port, o.admin_port], o.ops_port, READY_TIMEOUT_S)
        admin_tls = ["--ca-file", str(o.tls_ca), "--client-cert", str(o.admin_tls / "client.crt")]
        admin_tls += ["--client-key", str(o.admin_tls / "client.key"), "-o", f"127.0.0.1:{o.admin_port}"]
        self._tool(
            "osnadmin",
            "channel",
            "join",
            "--channelID",
            self.channel,
            "--config-block",
            str(block),
            *admin_tls,
        )
        for org, peer in zip(self.orgs, peers, strict=True):
            peer.wait_ready([org.peer_port], org.ops_port, READY_TIMEOUT_S)
        joins = [self._peer(org.name, "channel", "join", "-b", str(block), admin=True) for org in self.orgs]
        run_all(joins, self._clilogs)
        self._wait_raft_leader(orderer)
        self._write_profiles()

    # --- orgs and identities -------------------------------------------------------------------------------

    def org(self, name: str) -> Org:
        for org in self.orgs:
            if org.name == name:
                return org
        raise UnknownOrg(f"no org {name!r} in this network (orgs: {', '.join(o.name for o in self.orgs)})")

    def identity(self, org: str, *, admin: bool = False) -> Identity:
        """The org's User1 (what clients act as), or its Admin (what installs and approves chaincode)."""
        return self.org(org).identity("Admin" if admin else "User1")

    def profile_path(self, org: str) -> Path:
        """The org's common connection profile (JSON); its User's identity is ``identity.json`` beside it."""
        return self.workdir / "profiles" / self.org(org).name / "connection.json"

    def pids(self) -> list[int]:
        """Every process this network has running (orderer, peers, chaincode servers)."""
        return [s.pid for s in self._servers if s.proc.poll() is None]

    def ports(self) -> list[int]:
        """Every loopback port this network listens on."""
        o = self._orderer
        ports = [] if o is None else [o.port, o.admin_port, o.ops_port]
        ports += [p for org in self.orgs for p in (org.peer_port, org.chaincode_port, org.ops_port)]
        return ports + [p for d in self.deployments.values() for p in d.ports.values()]

    # --- chaincode -----------------------------------------------------------------------------------------

    def deploy_chaincode(
        self,
        name: str,
        version: str,
        sequence: int,
        sources: Mapping[str, Path],
        init_args: Sequence[str] | None = None,
        *,
        timeout_s: float = 60.0,
    ) -> Deployment:
        """Install, serve, approve and commit ``name`` on every org, each org's peer talking to its own
        server of ``sources[org]``; ``init_args`` (``[function, *args]``) make the definition init-required
        and are invoked once committed. A higher ``sequence`` upgrades: the state stays, the previous
        servers stop once the new definition is committed."""
        names = {o.name for o in self.orgs}
        if set(sources) != names:
            raise UnknownOrg(
                f"sources must name every org once: unknown {sorted(set(sources) - names)}, "
                f"missing {sorted(names - set(sources))}"
            )
        for source in {Path(p).resolve() for p in sources.values()}:
            chaincode.ensure_node_modules(source, self.workdir / "logs")
        label = f"{name}_{version}"
        ports = dict(zip(sources, free_ports(len(sources)), strict=True))
        packages = {
            org: chaincode.write_package(
                self.workdir / "packages" / f"{name}-{sequence}-{org}", label, f"127.0.0.1:{port}"
            )
            for org, port in ports.items()
        }
        # A ccaas package id is its label and its bytes' hash: the servers start while the peers install.
        ids = {org: f"{label}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for org, p in packages.items()}
        deployment = Deployment(name, version, sequence, init_args is not None, ids, ports)
        try:
            for org, source in sources.items():
                deployment.servers[org] = self._serve_chaincode(
                    f"{name}-{sequence}-{org}", Path(source), ports[org], ids[org], org
                )
            install = [
                self._peer(org, "lifecycle", "chaincode", "install", str(packages[org]), admin=True)
                for org in sources
            ]
            for org, result in zip(sources, run_all(install, self._clilogs, timeout_s), strict=True):
                if installed_package_id(result) != ids[org]:
                    raise FabricError(
                        f"{org}: the peer installed {installed_package_id(result)}, not {ids[org]}"
                    )
            for org, server in deployment.servers.items():
                server.wait_ready([ports[org]], None, READY_TIMEOUT_S)
            self._approve_and_commit(deployment, timeout_s)
            if init_args is not None:
                self._submit(self.orgs[0].name, name, list(init_args), sorted(names), init=True, admin=True)
        except PeerCommandError as exc:
            report = self._log_tails([*deployment.servers.values(), *self._peers])
            self._stop_servers(deployment)
            raise ChaincodeDeployError(
                f"deploying {name} {version} (sequence {sequence}): {exc}\n{report}"
            ) from exc
        except BaseException:
            self._stop_servers(deployment)
            raise
        previous = self.deployments.get(name)
        if previous is not None:
            self._stop_servers(previous)
        self.deployments[name] = deployment
        return deployment

    def invoke(
        self,
        org: str,
        fn: str,
        args: Sequence[str],
        *,
        chaincode: str,
        endorsing_orgs: Sequence[str] | None = None,
        admin: bool = False,
    ) -> str:
        """Submit a transaction as ``org``'s User (or Admin), endorsed by the peers of ``endorsing_orgs``
        (default: every org); return the chaincode's response payload once every peer has committed the
        block. A transaction the peers mark invalid raises ``TransactionInvalid`` with the status."""
        endorsers = (
            [o.name for o in self.orgs]
            if endorsing_orgs is None
            else [self.org(o).name for o in endorsing_orgs]
        )
        result = self._submit(org, chaincode, [fn, *args], endorsers, init=False, admin=admin)
        self._wait_peers_synced(endorsers)
        return invoke_payload(result)

    def query(self, org: str, fn: str, args: Sequence[str], *, chaincode: str, admin: bool = False) -> str:
        """Evaluate a transaction on ``org``'s own peer (nothing is ordered) and return its payload."""
        body = json.dumps({"Args": [fn, *args]})
        call = self._peer(
            org, "chaincode", "query", "-C", self.channel, "-n", chaincode, "-c", body, admin=admin
        )
        return run(call, self._clilogs).stdout.removesuffix("\n")

    def height(self, org: str) -> int:
        """The channel's block height on ``org``'s peer."""
        return self._heights([self.org(org).name])[0]

    # --- internals -----------------------------------------------------------------------------------------

    @property
    def _clilogs(self) -> Path:
        return self.workdir / "logs" / "cli"

    def _bin(self, name: str) -> str:
        return str(self.fabric / "bin" / name)

    def _env(self, settings: Mapping[str, str]) -> dict[str, str]:
        """Fabric's default log format colours its output even into a file; the tails in errors stay plain."""
        plain = "%{time:2006-01-02 15:04:05.000 MST} [%{module}] %{shortfunc} -> %{level:.4s} %{message}"
        return clean_env(
            {"FABRIC_CFG_PATH": str(self.workdir / "config"), "FABRIC_LOGGING_FORMAT": plain, **settings}
        )

    def _tool(self, name: str, *args: str) -> CliResult:
        return run(Cli(name, [self._bin(name), *args], self._env({})), self._clilogs)

    def _peer(self, org: str, *args: str, admin: bool = False) -> Cli:
        """A ``peer`` CLI call as the org's User or Admin; the step name (for errors) is the org and verb."""
        o = self.org(org)
        env = self._env(config.peer_client_settings(o, self.identity(org, admin=admin)))
        return Cli(f"{org} peer {' '.join(args[:3])}", [self._bin("peer"), *args], env)

    def _serve(self, name: str, argv: list[str], settings: Mapping[str, str]) -> Server:
        """A Fabric server process (``argv[0]`` names the binary), its log in logs/<name>.log."""
        argv = [self._bin(argv[0]), *argv[1:]]
        server = Server.spawn(
            name, argv, self._env(settings), self.workdir / "logs" / f"{name}.log", self.workdir
        )
        self._servers.append(server)
        return server

    def _serve_chaincode(self, name: str, source: Path, port: int, package_id: str, org: str) -> Server:
        source = source.resolve()
        argv = chaincode.server_argv(source, f"127.0.0.1:{port}", package_id)
        env = chaincode.server_env(self.org(org).msp_id)
        server = Server.spawn(
            f"chaincode {name}", argv, env, self.workdir / "logs" / f"chaincode-{name}.log", source
        )
        self._servers.append(server)
        return server

    def _orderer_args(self) -> list[str]:
        assert self._orderer is not None
        return ["-o", self._orderer.address, "--tls", "--cafile", str(self._orderer.tls_ca)]

    def _peer_args(self, orgs: Sequence[str]) -> list[str]:
        args: list[str] = []
        for org in map(self.org, orgs):
            args += ["--peerAddresses", org.peer_address, "--tlsRootCertFiles", str(org.tls_ca)]
        return args

    def _wait_raft_leader(self, orderer: Server) -> None:
        """Transactions sent before the single raft node has elected itself are refused ("no Raft leader")."""
        assert self._orderer is not None
        url = f"http://127.0.0.1:{self._orderer.ops_port}/metrics"
        line = f'consensus_etcdraft_is_leader{{channel="{self.channel}"}} 1'
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if line in resp.read().decode():
                    return
            time.sleep(0.05)
        raise orderer.failure(f"no raft leader for {self.channel} after {READY_TIMEOUT_S} s")

    def _write_profiles(self) -> None:
        assert self._orderer is not None
        for org in self.orgs:
            d = self.workdir / "profiles" / org.name
            d.mkdir(parents=True)
            profile = config.connection_profile(org, self.orgs, self._orderer, self.channel)
            (d / "connection.json").write_text(json.dumps(profile, indent=2))
            (d / "identity.json").write_text(config.identity_document(self.identity(org.name)))

    def _approve_and_commit(self, d: Deployment, timeout_s: float) -> None:
        definition = ["-C", self.channel, "-n", d.name, "-v", d.version, "--sequence", str(d.sequence)]
        if d.init_required:
            definition.append("--init-required")
        approve = [
            "lifecycle",
            "chaincode",
            "approveformyorg",
            *self._orderer_args(),
            *definition,
            "--waitForEvent",
        ]
        calls = [
            self._peer(org, *approve, "--package-id", pid, admin=True) for org, pid in d.package_ids.items()
        ]
        run_all(calls, self._clilogs, timeout_s)
        everyone = [o.name for o in self.orgs]
        commit = [
            "lifecycle",
            "chaincode",
            "commit",
            *self._orderer_args(),
            *definition,
            *self._peer_args(everyone),
        ]
        run(
            self._peer(everyone[0], *commit, admin=True), self._clilogs, timeout_s
        )  # waits on every peer named

    def _submit(
        self, org: str, cc: str, args: list[str], endorsers: list[str], *, init: bool, admin: bool
    ) -> CliResult:
        argv = ["chaincode", "invoke", "-C", self.channel, "-n", cc, "-c", json.dumps({"Args": args})]
        argv += [
            *self._orderer_args(),
            *self._peer_args(endorsers),
            "--waitForEvent",
            *(["--isInit"] if init else []),
        ]
        return run(self._peer(org, *argv, admin=admin), self._clilogs)

    def _wait_peers_synced(self, committed_at: Sequence[str], timeout_s: float = 30.0) -> None:
        """The CLI waits for the commit on the peers it talked to; a later query may go to any org's peer."""
        others = [o.name for o in self.orgs if o.name not in committed_at]
        if not others:
            return
        target = max(self._heights(committed_at))
        deadline = time.monotonic() + timeout_s
        while others:
            others = [o for o, h in zip(others, self._heights(others), strict=True) if h < target]
            if others and time.monotonic() > deadline:
                raise FabricError(f"peers of {others} did not reach height {target} in {timeout_s} s")
            if others:
                time.sleep(0.05)

    def _heights(self, orgs: Sequence[str]) -> list[int]:
        calls = [self._peer(org, "channel", "getinfo", "-c", self.channel) for org in orgs]
        return [channel_height(r) for r in run_all(calls, self._clilogs)]

    @property
    def _peers(self) -> list[Server]:
        return [s for s in self._servers if s.name.startswith("peer-")]

    @staticmethod
    def _log_tails(servers: Sequence[Server]) -> str:
        return "\n".join(f"--- end of {s.log} ---\n{log_tail(s.log, 1500)}" for s in servers)

    def _stop_servers(self, d: Deployment) -> None:
        servers = list(d.servers.values())
        stop_all(servers)
        self._servers = [s for s in self._servers if s not in servers]
