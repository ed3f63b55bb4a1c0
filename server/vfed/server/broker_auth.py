"""Broker accounts: every node has a broker password of its own, and only the server may publish.

The server keeps two files in Mosquitto's own formats in one folder: `passwd` (`$7$` PBKDF2-SHA512 hashes,
what `mosquitto_passwd` writes) and `acl` (the server writes `vfed/nodes/#`; node N reads `vfed/nodes/N`;
nothing else). They are rewritten whenever a node's broker password appears, changes or goes away, and a
configured Mosquitto is told to reload them (SIGHUP to its pid file). The embedded broker reads the same two
files (vfed.server.embedded_auth), so both brokers enforce the same rules with the same credentials.

A node's broker password is derived from its API key (an HMAC under a label of its own), so it is as random
as the key, the server stores only its hash, a node gets the same password at every login without the
server keeping it, and rotating the API key replaces it. A broker password reveals nothing of the API key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from vfed.common.api.doorbell import TOPIC_PREFIX
from vfed.server.config import Settings
from vfed.server.models import Node

log = logging.getLogger(__name__)

SERVER_USERNAME = "vfed-server"
PASSWD = "passwd"
ACL = "acl"
CONF = "mosquitto.conf"
PID = "mosquitto.pid"
SERVER_PASSWORD = "vfed-server.password"
ITERATIONS = 101  # what mosquitto_passwd (2.0) writes; the hash guards a 256-bit random secret, not a word
_LABEL = b"vfed broker password v1"


def mosquitto_hash(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """A Mosquitto 2.0 `$7$` password-file hash: PBKDF2-HMAC-SHA512, base64 salt and digest."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_hash(password: str, stored: str) -> bool:
    """True when `password` matches a `$7$` hash; anything else (other formats, junk) is False."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt, digest = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    if not 1 <= iterations <= 1_000_000:
        return False
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations), digest)


def node_username(node_id: int) -> str:
    return f"node-{node_id}"


def node_password(api_key: str) -> str:
    """The node's broker password: an HMAC of its API key, so nobody but a holder of the key can know it."""
    digest = hmac.new(api_key.encode(), _LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def passwd_text(accounts: Iterable[tuple[str, str]]) -> str:
    """The password file: `username:hash` per line."""
    return "".join(f"{user}:{stored}\n" for user, stored in accounts)


def acl_text(node_ids: Iterable[int], server: str = SERVER_USERNAME) -> str:
    """The ACL file: the server writes every node's topic; each node reads its own; nothing else."""
    lines = [
        "# written by vserver: the server publishes doorbells, node N reads vfed/nodes/N, nothing else",
        f"user {server}",
        f"topic write {TOPIC_PREFIX}#",
    ]
    for node_id in node_ids:
        lines += ["", f"user {node_username(node_id)}", f"topic read {TOPIC_PREFIX}{node_id}"]
    return "\n".join(lines) + "\n"


def parse_passwd(text: str) -> dict[str, str]:
    """username -> hash (malformed lines are skipped, as Mosquitto does)."""
    users = {}
    for line in text.splitlines():
        user, sep, stored = line.strip().partition(":")
        if sep and user and not user.startswith("#"):
            users[user] = stored
    return users


def parse_acl(text: str) -> dict[str, list[tuple[str, str]]]:
    """username -> [(access, topic)] for the `user` and `topic` lines of a Mosquitto ACL file."""
    rules: dict[str, list[tuple[str, str]]] = {}
    user: str | None = None
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user" and len(words) == 2:
            user = words[1]
            rules.setdefault(user, [])
        elif words[0] == "topic" and user is not None:
            access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[-1])
            rules[user].append((access, topic))
    return rules


def write_private(path: Path, text: str) -> None:
    """Replace `path` atomically with an owner-only file (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def broker_folder(settings: Settings) -> Path | None:
    """Where the broker's files live: `mqtt.broker_dir`, or `<data_dir>/broker` for the embedded broker;
    None for a broker the server does not manage (its accounts are the operator's business)."""
    if settings.mqtt.broker_dir is not None:
        return settings.mqtt.broker_dir
    if settings.mqtt.url is None and settings.mqtt.embedded_broker:
        return settings.data_dir / "broker"
    return None


def server_password(settings: Settings, folder: Path) -> str:
    """The server's own broker password: configured, from `mqtt.password_file`, or made once in the folder."""
    m = settings.mqtt
    if m.password is not None:
        return m.password
    path = m.password_file or folder / SERVER_PASSWORD
    if m.password_file is None and not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


@dataclass
class BrokerAccounts:
    """The broker files the server keeps current; `folder` None: the server manages no broker accounts."""

    folder: Path | None
    pid_file: Path | None = None
    username: str = SERVER_USERNAME
    password: str | None = None
    _server_hash: str | None = None
    _lock: asyncio.Lock | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> BrokerAccounts:
        folder = broker_folder(settings)
        if folder is None:
            return cls(None)
        return cls(folder, settings.mqtt.broker_pid_file, settings.mqtt.username or SERVER_USERNAME)

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def load_server_password(self, settings: Settings) -> str:
        """Read (or make) the server's password; its hash goes into every password file written."""
        assert self.folder is not None
        self.password = server_password(settings, self.folder)
        self._server_hash = mosquitto_hash(self.password)
        return self.password

    async def sync(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Rewrite both files from the database and have the broker reload them."""
        if self.folder is None:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            async with sessions() as s:
                rows = (
                    await s.execute(
                        select(Node.id, Node.broker_password_hash)
                        .where(Node.broker_password_hash.is_not(None))
                        .order_by(Node.id)
                    )
                ).all()
            await asyncio.to_thread(self.write, [(node_id, str(stored)) for node_id, stored in rows])
        self.reload()

    def write(self, nodes: list[tuple[int, str]]) -> None:
        """Write `passwd` and `acl` for the server and these (node id, hash) pairs."""
        assert self.folder is not None and self._server_hash is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        accounts = [(self.username, self._server_hash)] + [(node_username(i), h) for i, h in nodes]
        write_private(self.folder / ACL, acl_text((i for i, _ in nodes), self.username))
        write_private(self.folder / PASSWD, passwd_text(accounts))

    def reload(self) -> None:
        """SIGHUP the configured Mosquitto; a broker that is not there is logged, never an error."""
        if self.pid_file is None:
            return
        try:
            pid = int(self.pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError, IndexError) as exc:
            log.warning("Mosquitto not reloaded (pid file %s: %s)", self.pid_file, exc)


BROKER = web.AppKey("broker_accounts", BrokerAccounts)
