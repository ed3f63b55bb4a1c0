"""The trust store: organization id -> pinned fingerprint of its first key, like SSH's known_hosts.

One line per organization: `<organization id> <fingerprint> [head=<key id>] [# comment]`. Pins travel out of
band (an admin reads `vnode keys show` and hands the fingerprint over); `tofu` mode pins at first sight.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from vfed.common.trust.keychain import parse_fingerprint, show_fingerprint


class TrustMode(StrEnum):
    PINNED = "pinned"  # refuse any organization without a pin
    TOFU = "tofu"  # pin at first sight, refuse any later mismatch


@dataclass(frozen=True)
class Pin:
    organization_id: int
    root: str  # key id of the first key (32 hex)
    head: str | None = None  # after a fork: the head the admin chose
    note: str = ""

    def line(self) -> str:
        head = f" head={self.head}" if self.head else ""
        note = f"  # {self.note}" if self.note else ""
        return f"{self.organization_id} {show_fingerprint(self.root)}{head}{note}"


class TrustStoreError(Exception):
    """The trust store file cannot be read or written."""


class TrustStore:
    """Pins kept in a file (or only in memory when `path` is None); safe to share between threads."""

    def __init__(self, path: Path | None, mode: TrustMode = TrustMode.PINNED) -> None:
        self.path = path
        self.mode = TrustMode(mode)
        self._pins: dict[int, Pin] = {}
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            stat = self.path.stat()
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TrustStoreError(f"cannot read trust store {self.path}: {exc.strerror}") from None
        pins: dict[int, Pin] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line, _, note = raw.partition("#")
            words = line.split()
            if not words:
                continue
            try:
                org = int(words[0])
                root = parse_fingerprint(words[1])
                head = next((parse_fingerprint(w[5:]) for w in words[2:] if w.startswith("head=")), None)
            except (ValueError, IndexError):
                raise TrustStoreError(
                    f"{self.path}:{number}: expected `ORG_ID FINGERPRINT [head=KEY_ID]`"
                ) from None
            pins[org] = Pin(org, root, head, note.strip())
        self._pins, self._mtime = pins, stat.st_mtime

    def reload_if_changed(self) -> None:
        """Pick up pins another process (`vnode trust`) wrote."""
        if self.path is None:
            return
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime != self._mtime:
            with self._lock:
                self._load()

    def get(self, organization_id: int) -> Pin | None:
        return self._pins.get(organization_id)

    def pins(self) -> list[Pin]:
        return sorted(self._pins.values(), key=lambda p: p.organization_id)

    def pin(self, organization_id: int, fingerprint: str, head: str | None = None, note: str = "") -> Pin:
        """Pin (or re-pin) an organization and save the file."""
        pin = Pin(
            organization_id,
            parse_fingerprint(fingerprint),
            parse_fingerprint(head) if head else None,
            note.replace("\n", " "),
        )
        with self._lock:
            self._pins[organization_id] = pin
            self._save()
        return pin

    def unpin(self, organization_id: int) -> bool:
        with self._lock:
            found = self._pins.pop(organization_id, None) is not None
            if found:
                self._save()
        return found

    def _save(self) -> None:
        if self.path is None:
            return
        lines = ["# vfed trust store: organization id, fingerprint of its first key [head=KEY_ID]"]
        lines += [p.line() for p in sorted(self._pins.values(), key=lambda p: p.organization_id)]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".trust-", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
            os.replace(tmp, self.path)
            self._mtime = self.path.stat().st_mtime
        except OSError as exc:
            raise TrustStoreError(f"cannot write trust store {self.path}: {exc.strerror}") from None
