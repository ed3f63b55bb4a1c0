"""The trust store: organization id -> pinned fingerprint of its first key, like SSH's known_hosts.

One line per organization: `<organization id> <fingerprint> [head=<key id>] [# comment]`. Pins travel out of
band (an admin reads `vnode keys show` and hands the fingerprint over); `tofu` mode pins at first sight. The
federation file (`vserver import`) may carry each organization's fingerprint: `read_federation_file` reads
them for `vnode trust import` and `vfed trust import`, which trust whoever wrote that file.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

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


class FederationFileError(Exception):
    """The federation file cannot be read, or it names an organization's fingerprint wrongly."""


@dataclass(frozen=True)
class FederationEntry:
    """An organization of the federation file: its name and, when the file gives one, its first key's id."""

    name: str
    root: str | None


@dataclass(frozen=True)
class NamedPin:
    """A pin made from the federation file; `new` is False when the organization was pinned to it already."""

    name: str
    pin: Pin
    new: bool


def read_federation_file(path: Path) -> list[FederationEntry]:
    """The organizations of a `vserver import` file (`organizations: [{name, fingerprint}, ...]`; any other
    key is ignored), in file order, each name once; FederationFileError naming the entry when it is wrong."""
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FederationFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        problem = " ".join(str(exc).split())
        raise FederationFileError(f"{path} is not valid YAML: {problem}") from None
    organizations = raw.get("organizations") if isinstance(raw, dict) else None
    if not isinstance(organizations, list):
        raise FederationFileError(f"{path}: expected `organizations: [{{name: ..., fingerprint: ...}}, ...]`")
    entries: dict[str, FederationEntry] = {}
    for number, item in enumerate(organizations):
        where = f"{path}: organizations.{number}"
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise FederationFileError(f"{where}: an organization needs a name")
        text = item.get("fingerprint")
        root = None
        if text is not None:
            if not isinstance(text, str):
                raise FederationFileError(f"{where} ({name}): write the fingerprint in quotes, as text")
            try:
                root = parse_fingerprint(text)
            except ValueError as exc:
                raise FederationFileError(f"{where} ({name}): {exc}") from None
        seen = entries.get(name)
        if seen is not None and root is not None and seen.root not in (None, root):
            raise FederationFileError(f"{where}: organization {name!r} is listed with two fingerprints")
        if seen is None or seen.root is None:
            entries[name] = FederationEntry(name, root)
    return list(entries.values())


def pin_named(store: TrustStore, wanted: Sequence[tuple[str, int, str]], note: str) -> list[NamedPin]:
    """Pin each (name, organization id, key id of the first key). An organization pinned to another first key
    already is refused (FederationFileError) before anything is written: its admin decides, not the file. One
    pinned to this key already keeps its pin (and the head an admin chose after a fork)."""
    names: dict[int, str] = {}
    for name, organization_id, root in wanted:
        other = names.setdefault(organization_id, name)
        if other != name:
            raise FederationFileError(f"{other!r} and {name!r} are both organization {organization_id}")
        have = store.get(organization_id)
        if have is not None and have.root != root:
            raise FederationFileError(
                f"organization {organization_id} ({name}) is pinned to {show_fingerprint(have.root)}, the "
                f"file names {show_fingerprint(root)}: ask its admin which is right; to take the file's, "
                f"remove the pin first (`untrust {organization_id}`)"
            )
    done: list[NamedPin] = []
    for name, organization_id, root in wanted:
        have = store.get(organization_id)
        if have is not None:
            done.append(NamedPin(name, have, False))
        else:
            done.append(NamedPin(name, store.pin(organization_id, root, None, note), True))
    return done
