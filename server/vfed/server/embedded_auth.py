"""The embedded broker's (amqtt) authentication and topic plugins: the same password and ACL files as a
Mosquitto configured by `vserver broker config`, read again whenever the server rewrites them.

A rotated or deleted node's password is refused at its next connect; its open connection is closed by the
server's rewrite only on Mosquitto (which checks connected clients on reload), here at its next reconnect
(its topic rules are re-read per message, so it receives nothing meanwhile once its ACL lines are gone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from vfed.server.broker_auth import ACL, PASSWD, parse_acl, parse_passwd, verify_mosquitto_hash


class _Watched:
    """A file parsed again when its modification time or size changes (a missing file: empty)."""

    def __init__(self, path: Path, parse: Any) -> None:
        self.path = path
        self.parse = parse
        self._stamp: tuple[int, int, int] | None = None
        self._value: Any = parse("")

    def value(self) -> Any:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self._value = None, self.parse("")
            return self._value
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rewrite is a new file (os.replace)
        if stamp != self._stamp:
            self._value = self.parse(self.path.read_text())
            self._stamp = stamp
        return self._value


class PasswordFileAuth(BaseAuthPlugin):  # type: ignore[misc]  # amqtt has no type hints
    """Username and password against the `$7$` hashes of `<folder>/passwd`; no anonymous clients."""

    @dataclass
    class Config:
        folder: str

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._passwd = _Watched(Path(self.config.folder) / PASSWD, parse_passwd)

    async def authenticate(self, *, session: Session) -> bool:
        users: dict[str, str] = self._passwd.value()
        stored = users.get(session.username or "")
        password = session.password
        return stored is not None and password is not None and verify_mosquitto_hash(str(password), stored)


def covers(pattern: str, topic: str) -> bool:
    """Whether an ACL pattern covers a topic or a subscription filter (a wildcard in the filter is covered
    only by the same or a wider wildcard, as in Mosquitto: `vfed/nodes/3` does not cover `vfed/nodes/#`)."""
    want, have = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or have[i] == "#":
            return False
        if level != "+" and level != have[i]:
            return False
    return len(have) == len(want)


class AclTopicCheck(BaseTopicPlugin):  # type: ignore[misc]
    """Publish needs a `write` rule, subscribe and delivery a `read` rule, from `<folder>/acl`."""

    @dataclass
    class Config:
        folder: str

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._acl = _Watched(Path(self.config.folder) / ACL, parse_acl)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or not session.username or not topic:
            return False
        needed = "write" if action == Action.PUBLISH else "read"
        rules: dict[str, list[tuple[str, str]]] = self._acl.value()
        return any(
            access in (needed, "readwrite") and covers(pattern, topic)
            for access, pattern in rules.get(session.username, [])
        )
