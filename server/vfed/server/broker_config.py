"""`vserver broker config`: the production broker's (Mosquitto's) configuration, password and ACL files."""

from __future__ import annotations

import asyncio
import getpass
from dataclasses import dataclass
from pathlib import Path

from vfed.common.netaddr import is_loopback_host
from vfed.server import db
from vfed.server.broker_auth import ACL, CONF, PASSWD, PID, BrokerAccounts, write_private
from vfed.server.config import ConfigError, Settings


@dataclass(frozen=True)
class Listener:
    """Where Mosquitto listens and with which certificate (None: plain MQTT, only when asked for)."""

    host: str
    port: int
    cert_file: Path | None
    key_file: Path | None


def parse_listen(value: str, tls: bool) -> tuple[str, int]:
    """HOST:PORT or HOST (port 8883 with TLS, 1883 without); ConfigError in one line otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, 8883 if tls else 1883
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen {value!r}: use HOST:PORT, e.g. 0.0.0.0:8883")
    return host.strip("[]"), int(port)


def mosquitto_conf(folder: Path, listener: Listener, run_as: str) -> str:
    """The configuration: no anonymous clients, our password and ACL files, a pid file for reloads."""
    lines = [
        "# written by `vserver broker config`; vserver rewrites passwd and acl when nodes log in, rotate",
        "# their API key or are deleted, then sends SIGHUP to the pid below (Mosquitto re-reads both files",
        "# and disconnects clients whose password is gone)",
        f"user {run_as}",
        f"pid_file {folder / PID}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {folder / PASSWD}",
        f"acl_file {folder / ACL}",
        "persistence false",
        # PUBACKs leave at once: with Nagle on, a batch of doorbells waited for the publisher's delayed ACK
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "",
        f"listener {listener.port} {listener.host}",
    ]
    if listener.cert_file is not None and listener.key_file is not None:
        lines += [f"certfile {listener.cert_file.resolve()}", f"keyfile {listener.key_file.resolve()}"]
        lines.append("tls_version tlsv1.2")
    return "\n".join(lines) + "\n"


def prepare(settings: Settings, folder: Path, listener: Listener, run_as: str) -> BrokerAccounts:
    """The folder, mosquitto.conf and the server's own broker password."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid_file = settings.mqtt.broker_pid_file or folder / PID
    accounts = BrokerAccounts(folder, pid_file, settings.mqtt.username or "vfed-server")
    accounts.load_server_password(settings)
    write_private(folder / CONF, mosquitto_conf(folder, listener, run_as))
    return accounts


async def write_accounts(settings: Settings, accounts: BrokerAccounts) -> None:
    """The password and ACL files from the database's nodes; a running Mosquitto of this folder reloads."""
    engine = db.make_engine(settings.db_url())
    try:
        await db.upgrade(engine)
        await accounts.sync(db.make_sessionmaker(engine))
    finally:
        await engine.dispose()


def broker_config(
    settings: Settings,
    folder: Path | None,
    listen: str,
    cert_file: Path | None,
    key_file: Path | None,
    insecure_plain: bool,
    run_as: str | None,
) -> list[str]:
    """What `vserver broker config` does; the lines it prints. ConfigError (one line) for bad input."""
    folder = folder or settings.mqtt.broker_dir
    if folder is None:
        raise ConfigError("where should the files go? set mqtt.broker_dir in the config or pass --dir")
    tls = cert_file is not None or key_file is not None
    if tls and (cert_file is None or key_file is None):
        raise ConfigError("--cert-file and --key-file go together")
    if not tls and not insecure_plain:
        raise ConfigError(
            "the broker carries the nodes' broker passwords: give --cert-file and --key-file, or "
            "--insecure-plain for a broker on loopback or a network you trust"
        )
    for given in (cert_file, key_file):
        if given is not None and not given.is_file():
            raise ConfigError(f"{given}: no such file")
    host, port = parse_listen(listen, tls)
    listener = Listener(host, port, cert_file, key_file)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    accounts = prepare(settings, folder, listener, run_as or getpass.getuser())
    asyncio.run(write_accounts(settings, accounts))
    scheme = "mqtts" if tls else "mqtt"
    reach = "127.0.0.1" if host in ("0.0.0.0", "::") or is_loopback_host(host) else host
    lines = [
        f"wrote {folder / CONF}, {folder / PASSWD} and {folder / ACL}",
        f"start the broker: mosquitto -c {folder / CONF}   (reload: kill -HUP $(cat {accounts.pid_file}))",
        "server config (mqtt:), so vserver keeps the files current and tells nodes where to listen:",
        f"  url: {scheme}://{reach}:{port}",
        f"  broker_dir: {folder}",
        f"  broker_pid_file: {accounts.pid_file}",
        f"  public_url: {scheme}://<the broker's name as nodes reach it>:{port}",
    ]
    if tls:
        lines.append("  ca_file: <the CA that signed the broker's certificate, if not a public one>")
    if settings.mqtt.broker_dir is not None and folder.resolve() != settings.mqtt.broker_dir.resolve():
        lines.append(f"note: the server rewrites mqtt.broker_dir ({settings.mqtt.broker_dir}), not {folder}")
    return lines
