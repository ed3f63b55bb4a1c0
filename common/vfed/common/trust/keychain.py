"""An organization's chain of keys, verifiable without the server's word.

The first record (`key.genesis`) is self-signed; each rotation (`key.rotation`) names the previous key and is
signed by the previous and the new key. Nodes and clients pin the fingerprint of an organization's first key
(like SSH's known_hosts); the server only stores and serves the records. Two valid rotations from one key are
a fork: the key is treated as compromised and both branches are refused until an admin pins the intended head.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vfed.common.crypto import CryptoError, OrgKey, PublicKey
from vfed.common.trust.entries import SignedEntry, sign_entry
from vfed.common.trust.errors import ChainForked, ChainInvalid, MalformedEntry, UntrustedKey

KIND_GENESIS = "key.genesis"
KIND_ROTATION = "key.rotation"
KEY_KINDS = frozenset({KIND_GENESIS, KIND_ROTATION})
MAX_CHAIN_RECORDS = 1000
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def fingerprint(key: PublicKey) -> str:
    """Short and human-comparable: the key id in eight groups of four hex digits."""
    hexed = key.key_id
    return "-".join(hexed[i : i + 4] for i in range(0, 32, 4))


def parse_fingerprint(text: str) -> str:
    """A fingerprint as typed (groups, spaces, colons, upper case) -> the 32-hex key id; ValueError if not."""
    cleaned = re.sub(r"[\s:\-]", "", text).lower()
    if cleaned.startswith("vfed"):
        cleaned = cleaned[4:]
    if not _HEX32.match(cleaned):
        raise ValueError(f"{text!r} is not a key fingerprint (32 hex digits, e.g. {'ab12-' * 7}ab12)")
    return cleaned


def show_fingerprint(key_id: str) -> str:
    return "-".join(key_id[i : i + 4] for i in range(0, len(key_id), 4))


def genesis_record(organization_id: int, key: OrgKey, created_at: int | None = None) -> SignedEntry:
    body = {
        "org": organization_id,
        "key": key.public.to_text(),
        "created_at": int(created_at if created_at is not None else key.created_s or time.time()),
    }
    return sign_entry(KIND_GENESIS, body, [key])


def rotation_record(
    organization_id: int, previous: OrgKey, new: OrgKey, created_at: int | None = None
) -> SignedEntry:
    body = {
        "org": organization_id,
        "key": new.public.to_text(),
        "prev": previous.key_id,
        "created_at": int(created_at if created_at is not None else new.created_s or time.time()),
    }
    return sign_entry(KIND_ROTATION, body, [previous, new])


def records_for_keys(organization_id: int, keys: Sequence[OrgKey]) -> list[SignedEntry]:
    """The whole chain of a keyring (oldest first), as its holder publishes it."""
    records = [genesis_record(organization_id, keys[0])]
    records += [rotation_record(organization_id, a, b) for a, b in itertools.pairwise(keys)]
    return records


@dataclass(frozen=True)
class ChainKey:
    key: PublicKey
    valid_from: int
    superseded_at: int | None = None  # when the next key's rotation record was made


@dataclass(frozen=True)
class KeyChain:
    """A verified chain: every key the organization held, oldest first; the last one is the head."""

    organization_id: int
    keys: tuple[ChainKey, ...]
    records: tuple[SignedEntry, ...] = field(repr=False, default=())

    @property
    def root(self) -> PublicKey:
        return self.keys[0].key

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.root)

    @property
    def head(self) -> PublicKey:
        return self.keys[-1].key

    def get(self, key_id: str) -> ChainKey | None:
        return next((k for k in self.keys if k.key.key_id == key_id), None)

    def public(self, key_id: str) -> PublicKey | None:
        found = self.get(key_id)
        return found.key if found is not None else None

    def lookup(self) -> Callable[[str], PublicKey | None]:
        """A sender lookup for decryption: any key this organization ever held."""
        return self.public

    def usable(self, key_id: str, now: float, grace_s: float) -> bool:
        """The head, or an older key whose successor is younger than the grace period."""
        found = self.get(key_id)
        if found is None:
            return False
        return found.superseded_at is None or now - found.superseded_at <= grace_s


def record_key(entry: SignedEntry) -> PublicKey:
    """The public key an entry's body names (`key`); ChainInvalid when it names none or an unreadable one."""
    text = entry.body.get("key")
    if not isinstance(text, str):
        raise ChainInvalid(f"{entry.kind} record names no key")
    try:
        return PublicKey.from_text(text)
    except CryptoError as exc:
        raise ChainInvalid(f"{entry.kind} record holds an unreadable key: {exc}") from None


def _created(entry: SignedEntry) -> int:
    value = entry.body.get("created_at")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ChainInvalid(f"{entry.kind} record has no valid created_at")
    return value


def parse_records(raw: Iterable[Any]) -> list[SignedEntry]:
    """Entries from the server's answer (objects or JSON text); anything else is ChainInvalid."""
    records: list[SignedEntry] = []
    for number, item in enumerate(raw):
        if number >= MAX_CHAIN_RECORDS:
            raise ChainInvalid(f"more than {MAX_CHAIN_RECORDS} key records")
        try:
            entry = SignedEntry.parse(item)
        except MalformedEntry as exc:
            raise ChainInvalid(f"key record {number}: {exc.message}") from None
        if entry.kind not in KEY_KINDS:
            raise ChainInvalid(f"key record {number} is of kind {entry.kind!r}")
        records.append(entry)
    return records


def _genesis(organization_id: int, records: list[SignedEntry], pin: str | None) -> SignedEntry:
    candidates = []
    for entry in records:
        if entry.kind != KIND_GENESIS:
            continue
        if entry.body.get("org") != organization_id:
            raise ChainInvalid(f"a first-key record names organization {entry.body.get('org')!r}")
        key = record_key(entry)
        try:
            entry.verify_by(key)
        except MalformedEntry as exc:
            raise ChainInvalid(f"organization {organization_id}: first key record: {exc.message}") from None
        candidates.append((key, entry))
    if not candidates:
        raise UntrustedKey(
            f"organization {organization_id} has published no key record", organization_id, pin, None
        )
    if pin is not None:
        for key, entry in candidates:
            if key.key_id == pin:
                return entry
        seen = candidates[0][0].key_id
        raise UntrustedKey(
            f"organization {organization_id}: its first key {fingerprint(candidates[0][0])} does not match "
            f"the pinned fingerprint {show_fingerprint(pin)}",
            organization_id,
            pin,
            seen,
        )
    if len(candidates) > 1:
        raise ChainInvalid(f"organization {organization_id} has {len(candidates)} first-key records")
    return candidates[0][1]


def _rotations_by_prev(organization_id: int, records: list[SignedEntry]) -> dict[str, list[SignedEntry]]:
    by_prev: dict[str, list[SignedEntry]] = {}
    for entry in records:
        if entry.kind != KIND_ROTATION:
            continue
        prev = entry.body.get("prev")
        if entry.body.get("org") != organization_id or not isinstance(prev, str):
            raise ChainInvalid(
                f"organization {organization_id}: a rotation record names another org or no key"
            )
        by_prev.setdefault(prev, []).append(entry)
    return by_prev


def _valid_rotation(prev: PublicKey, entry: SignedEntry) -> PublicKey:
    new = record_key(entry)
    try:
        entry.verify_by(prev)
        entry.verify_by(new)
    except MalformedEntry as exc:
        raise ChainInvalid(
            f"organization {entry.body.get('org')}: rotation from key {prev.key_id} does not verify: "
            f"{exc.message} (a rotation is signed by the previous and the new key)"
        ) from None
    return new


def verify_chain(
    organization_id: int, records: Sequence[SignedEntry], pin: str | None, head_pin: str | None = None
) -> KeyChain:
    """Verify an organization's records against the pinned first key (None: trust on first use).

    Every rotation must be signed by the previous and the new key; a record that does not verify is an
    error, not skipped. A fork is refused unless `head_pin` names a key on one of its branches.
    """
    records = list(records)
    first = _genesis(organization_id, records, pin)
    by_prev = _rotations_by_prev(organization_id, records)
    chain = [first]
    current = record_key(first)
    keys: list[tuple[PublicKey, int]] = [(current, _created(first))]
    seen = {current.key_id}
    while by_prev.get(current.key_id):
        nexts = [(e, _valid_rotation(current, e)) for e in by_prev[current.key_id]]
        if len(nexts) > 1:
            chosen = [n for n in nexts if _leads_to(n[1], head_pin, by_prev)] if head_pin else []
            if len(chosen) != 1:
                raise ChainForked(
                    f"organization {organization_id}: key {fingerprint(current)} signed "
                    f"{len(nexts)} different rotations (a fork: the key may be compromised); refused until "
                    "an admin pins the intended head (`vnode trust ORG --fingerprint F --head KEY_ID`)"
                )
            nexts = chosen
        entry, new = nexts[0]
        if new.key_id in seen:
            raise ChainInvalid(f"organization {organization_id}: the key chain loops at {new.key_id}")
        seen.add(new.key_id)
        chain.append(entry)
        keys.append((new, _created(entry)))
        current = new
    if head_pin is not None and head_pin not in seen:
        raise UntrustedKey(
            f"organization {organization_id}: the pinned head key {head_pin} is not on its chain",
            organization_id,
            head_pin,
            current.key_id,
        )
    chain_keys = tuple(
        ChainKey(key, valid_from, keys[i + 1][1] if i + 1 < len(keys) else None)
        for i, (key, valid_from) in enumerate(keys)
    )
    return KeyChain(organization_id, chain_keys, tuple(chain))


def _leads_to(key: PublicKey, target: str | None, by_prev: dict[str, list[SignedEntry]]) -> bool:
    """True when `target` is `key` or lies on a valid path of rotations from it."""
    todo, seen = [key], set()
    while todo:
        current = todo.pop()
        if current.key_id == target:
            return True
        if current.key_id in seen:
            continue
        seen.add(current.key_id)
        for entry in by_prev.get(current.key_id, []):
            try:
                todo.append(_valid_rotation(current, entry))
            except ChainInvalid:
                continue
    return False
