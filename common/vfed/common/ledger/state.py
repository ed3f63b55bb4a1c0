"""Verifying a ledger and what it says: datasets, leases, receipts, checkpoints.

`LedgerState` takes records in order and checks each before it counts: its place (sequence and hash chain),
its form, who signed it (organization keys anchored at the pinned fingerprints, admin keys through their
certificates), and the head its signer had seen. What a valid prefix says is then queried (`leases_for`,
`datasets`, `receipts`). Nothing here trusts the backend that served the records.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vfed.common.crypto import BadSignature, PublicKey
from vfed.common.ledger.chain import (
    EMPTY_HEAD,
    GENESIS_HASH,
    LEDGER_DOMAIN,
    Head,
    Record,
    entry_json,
    link,
    link_hashed,
)
from vfed.common.ledger.errors import LedgerEntryInvalid, LedgerForked, LedgerTampered, NoValidLease
from vfed.common.ledger.kinds import (
    ADMIN_ROLE,
    KIND_CHECKPOINT,
    KIND_DATASET,
    KIND_EXTEND,
    KIND_LEASE,
    KIND_RECEIPT,
    KIND_REVOKE,
    Body,
    Checkpoint,
    DatasetRegistered,
    LeaseExtended,
    LeaseGranted,
    LeaseRevoked,
    RunReceipt,
    parse_body,
)
from vfed.common.trust.certificates import (
    KIND_CERTIFICATE,
    KIND_REVOCATION,
    Certificate,
    verify_certificate,
)
from vfed.common.trust.entries import SignedEntry
from vfed.common.trust.errors import MalformedEntry, TrustError
from vfed.common.trust.keychain import KIND_GENESIS, KIND_ROTATION, KeyChain, record_key, verify_chain

log = logging.getLogger("vfed.ledger")

Anchor = Callable[[int], "str | None"]
"""Organization id -> the pinned first key's id, or None when it is not pinned."""
OnPin = Callable[[int, str], None]
_Done = tuple[str, bytes | None] | None
"""What `fast.preverify`'s workers made for an entry: its digest and (when made) the SHA-256 of its canonical
JSON; None when they made nothing."""
_Applying = tuple[SignedEntry, bytes | None, str]
"""The entry being applied, its signed message (None until something needs it) and its digest."""


@dataclass
class Dataset:
    digest: str
    seq: int
    org: int
    label: str
    description: str
    content_hash: str | None
    at: int


@dataclass
class Lease:
    id: str
    seq: int
    dataset: Dataset
    body: LeaseGranted
    expires_at: int
    revoked: LeaseRevoked | None = None
    revoked_seq: int | None = None
    extensions: list[tuple[int, int]] = field(default_factory=list)
    runs: int = 0
    """Receipts on the ledger that name this lease."""
    epsilon_spent: float = 0.0

    @property
    def owner(self) -> int:
        return self.body.owner

    @property
    def grantee(self) -> int:
        return self.body.grantee

    def status(self, now: float) -> str:
        if self.revoked is not None:
            return "revoked"
        if now < self.body.not_before:
            return "not-yet-valid"
        if now >= self.expires_at:
            return "expired"
        if self.body.max_runs is not None and self.runs >= self.body.max_runs:
            return "exhausted"
        return "active"

    def refusal(  # noqa: PLR0911
        self, *, grantee: int, user: int | None, images: Iterable[str], now: float
    ) -> str | None:
        """Why this lease does not cover a run now (terms only; counts are the node's to reserve), or None."""
        short = self.id[:12]
        if self.body.grantee != grantee:
            return f"lease {short} is granted to organization {self.body.grantee}, not {grantee}"
        if self.revoked is not None:
            return f"lease {short} was revoked ({self.revoked.reason or 'no reason given'})"
        if now < self.body.not_before:
            return f"lease {short} is valid only from {_when(self.body.not_before)}"
        if now >= self.expires_at:
            return f"lease {short} expired at {_when(self.expires_at)}"
        if self.body.users is not None and (user is None or user not in self.body.users):
            who = f"user {user}" if user is not None else "a run without a user"
            return f"lease {short} is for users {', '.join(map(str, self.body.users))}, not {who}"
        if self.body.images is not None:
            wanted = set(images)
            if not wanted & set(self.body.images):
                shown = ", ".join(sorted(wanted)) or "an image of unknown digest"
                return f"lease {short} does not allow image {shown}"
        return None


@dataclass(frozen=True)
class Receipt:
    seq: int
    digest: str
    body: RunReceipt


@dataclass(frozen=True)
class Problem:
    """An entry that counts for nothing here (its organization is not pinned), kept so it can be shown."""

    seq: int
    kind: str
    message: str


_LEASE_BODIES = (LeaseGranted, LeaseExtended, LeaseRevoked)


class _Holder:
    """A certificate taken in, its key, and what `verify_certificate` found against the chain it was last
    checked with: what lies in the certificate and that chain (its signature, its key) is checked once per
    chain; revocations and validity, which change along the ledger, at every use."""

    __slots__ = ("checked", "entry", "key")

    def __init__(self, entry: SignedEntry) -> None:
        self.entry = entry
        try:
            self.key: PublicKey | None = record_key(entry)
        except TrustError:
            self.key = None
        self.checked: tuple[KeyChain, Certificate | None] | None = None

    def verify(self, chain: KeyChain, revoked: set[str], *, now: float, skew_s: float) -> Certificate:
        """`verify_certificate(self.entry, chain, revoked, now=now, skew_s=skew_s)`."""
        checked = self.checked
        if checked is None or checked[0] is not chain:
            checked = self.checked = (chain, self._as_of_its_start(chain, skew_s))
        cert = checked[1]
        if (
            cert is not None
            and cert.digest not in revoked
            and now + skew_s >= cert.not_before
            and now - skew_s <= cert.expires_at
        ):
            return cert
        return verify_certificate(self.entry, chain, revoked, now=now, skew_s=skew_s)  # says what is wrong

    def _as_of_its_start(self, chain: KeyChain, skew_s: float) -> Certificate | None:
        """The certificate as verified at its own start, unrevoked; None if that fails (then every use
        checks it in full and reports what is wrong)."""
        start = self.entry.body.get("not_before")
        if not isinstance(start, int) or isinstance(start, bool):
            return None
        try:
            return verify_certificate(self.entry, chain, set(), now=start, skew_s=skew_s)
        except TrustError:
            return None


_Resolve = Callable[[int], tuple[frozenset[str], _Done]]
"""A job's answer for its entry at an index (waits for a check still under way)."""


class _Found:
    """What `fast.preverify` found for one entry object (`LedgerState._known`): its job's answer at `index`;
    called, the keys whose signatures held."""

    __slots__ = ("entry", "index", "resolve")

    def __init__(self, entry: SignedEntry, resolve: _Resolve, index: int) -> None:
        self.entry = entry
        self.resolve = resolve
        self.index = index

    def __call__(self) -> frozenset[str]:
        return self.resolve(self.index)[0]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class LedgerState:
    """A verified prefix of one collaboration's ledger and what it says."""

    def __init__(
        self,
        collaboration_id: int,
        *,
        anchors: Anchor,
        tofu: bool = False,
        on_pin: OnPin | None = None,
        skew_s: float = 300.0,
    ) -> None:
        self.collaboration_id = collaboration_id
        self._anchors = anchors
        self._tofu = tofu
        self._on_pin = on_pin
        self.skew_s = skew_s
        self._hashes: list[str] = [GENESIS_HASH]
        self._last_raw: tuple[str, bytes] | None = None
        """The last hash and its bytes, for `_link`."""
        try:
            self._link_prefix: bytes | None = LEDGER_DOMAIN + struct.pack(">Q", collaboration_id)
        except struct.error:  # link_hashed says so when it is needed
            self._link_prefix = None
        self._digests: dict[str, int] = {}
        self._kinds: list[str] = [""]
        self._key_records: dict[int, list[SignedEntry]] = {}
        self._chains: dict[int, KeyChain] = {}
        self._chain_keys: dict[int, tuple[KeyChain, dict[str, PublicKey]]] = {}
        """Organization -> its chain's keys by id (`chain.public` as a dict), for the chain they came from."""
        self._certificates: dict[int, list[SignedEntry]] = {}
        self._holders: dict[int, list[_Holder]] = {}
        """Organization -> its certificates (as `_certificates`) with their keys and what was verified."""
        self._revoked: dict[int, set[str]] = {}
        self._preverified: dict[int, frozenset[str] | Callable[[], frozenset[str]]] = {}
        self._applying: _Applying | None = None
        self.datasets: dict[str, Dataset] = {}
        self.leases: dict[str, Lease] = {}
        self._leases_to: dict[tuple[int, str, int], list[Lease]] = {}
        """(owner, dataset label, grantee) -> its leases, oldest first: what the lease check per run reads."""
        self.receipts: list[Receipt] = []
        self.checkpoints: list[tuple[int, Checkpoint]] = []
        self.problems: list[Problem] = []
        self._skipped: set[str] = set()
        self.last_signed: dict[int, int] = {}
        """Organization -> `at` of the last entry it signed (checkpoints are due when it is a day old)."""

    # -- position -------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return len(self._hashes) - 1

    @property
    def head(self) -> Head:
        return Head(seq=self.length, hash=self._hashes[-1]) if self.length else EMPTY_HEAD

    def hash_at(self, seq: int) -> str | None:
        return self._hashes[seq] if 0 <= seq < len(self._hashes) else None

    def kind_at(self, seq: int) -> str:
        return self._kinds[seq] if 0 < seq < len(self._kinds) else ""

    def check_head(self, head: Head, source: str = "") -> bool:
        """True when `head` is on this chain; False when it lies beyond what was verified (read further and
        ask again); LedgerForked when this chain has another entry there."""
        if head.seq > self.length:
            return False
        ours = self._hashes[head.seq]
        if ours != head.hash:
            raise LedgerForked(
                f"{source or 'a signer'} verified ledger head {head.short()}, but entry {head.seq} of this "
                f"node's ledger hashes to {ours[:12]}: the server shows different histories (a fork)",
                head.seq,
                ours,
                head.hash,
                source,
            )
        return True

    # -- applying -------------------------------------------------------------------------------------------
    def preverified(self, seq: int, key_ids: frozenset[str] | Callable[[], frozenset[str]]) -> None:
        """Signatures of entry `seq` by these keys were checked elsewhere (the local copy, what a server
        stored after checking it); a callable gives them when the entry is reached."""
        self._preverified[seq] = key_ids

    def _known(self, seq: int, entry: SignedEntry, resolve: _Resolve, index: int) -> None:
        """What `fast.preverify`'s workers found for this very entry object at `seq` (`resolve(index)` waits
        for a check still under way): the keys whose signatures held, its digest and entry hash. Used only
        when this object is applied at `seq`: never for another entry at that place (a server serving two, or
        a later read after this one failed)."""
        self._preverified[seq] = _Found(entry, resolve, index)

    def _digest(self, entry: SignedEntry) -> str:
        """`entry.digest`, without making the canonical body again for the entry being applied."""
        applying = self._applying
        return applying[2] if applying is not None and applying[0] is entry else entry.digest

    def _signed_by(self, entry: SignedEntry, key: PublicKey) -> bool:
        """`entry.signed_by(key)`, without making the canonical body again for the entry being applied."""
        applying = self._applying
        if applying is None or applying[0] is not entry:
            return entry.signed_by(key)
        for sig in entry.sigs:
            if sig.key_id == key.key_id:
                message = applying[1]
                if message is None:
                    message = entry.message()
                    self._applying = (entry, message, applying[2])
                try:
                    key.verify(message, sig.raw())
                except (BadSignature, MalformedEntry):
                    return False
                return True
        return False

    def apply_all(self, records: Iterable[Record]) -> None:
        for record in records:
            self.apply(record)

    def apply(self, record: Record) -> None:
        """Verify one record at the next place and take in what it says; a LedgerError leaves the state as it
        was before the call."""
        seq, entry = record.seq, record.entry
        message: bytes | None = None
        digest: str | None = None
        entry_hash: bytes | None = None
        found = self._preverified.get(seq)
        if type(found) is _Found:
            if found.entry is entry:
                done = found.resolve(found.index)[1]
                if done is not None:
                    digest, entry_hash = done
            else:  # found for another entry at this place: nothing of it holds for this one
                del self._preverified[seq]
        if digest is None:  # the canonical body, made once for all that needs it
            message = entry.message()
            digest = hashlib.sha256(message).hexdigest()
        self._applying = (entry, message, digest)
        where = f"ledger entry {seq} ({entry.kind} {digest[:12]})"
        if seq != self.length + 1:
            what = "missing" if seq > self.length + 1 else "repeated or out of order"
            raise LedgerTampered(
                f"{where}: expected entry {self.length + 1} next; entries are {what} (dropped or reordered?)"
            )
        if entry_hash is not None:
            computed = self._link(seq, entry_hash)
        else:
            if message is None:
                message = entry.message()
                self._applying = (entry, message, digest)
            computed = link(self.collaboration_id, seq, self._hashes[-1], entry_json(entry, message))
        if record.hash is not None and record.hash != computed:
            raise LedgerTampered(
                f"{where} was changed after it was chained: the stored hash {record.hash[:12]} does not "
                f"match its content ({computed[:12]})"
            )
        if digest in self._digests:
            raise LedgerTampered(f"{where} repeats entry {self._digests[digest]} (replayed)")
        try:
            self._take(seq, entry, where)
        finally:
            self._preverified.pop(seq, None)
        self._hashes.append(computed)
        self._kinds.append(entry.kind)
        self._digests[digest] = seq

    def _link(self, seq: int, entry_sha256: bytes) -> str:
        """`link_hashed` from the last hash (its bytes kept from the last call)."""
        last = self._hashes[-1]
        if self._link_prefix is None or not 0 <= seq < 1 << 64:
            return link_hashed(self.collaboration_id, seq, last, entry_sha256)
        raw = self._last_raw
        if raw is None or raw[0] is not last:
            raw = (last, bytes.fromhex(last))
        computed = hashlib.sha256(self._link_prefix + seq.to_bytes(8, "big") + raw[1] + entry_sha256).digest()
        text = computed.hex()
        self._last_raw = (text, computed)
        return text

    def _take(self, seq: int, entry: SignedEntry, where: str) -> None:
        kind = entry.kind
        if kind in (KIND_GENESIS, KIND_ROTATION):
            self._take_key_record(seq, entry, where)
            return
        if kind in (KIND_CERTIFICATE, KIND_REVOCATION):
            self._take_certificate(seq, entry, where)
            return
        body = parse_body(entry, where)
        if body.collab != self.collaboration_id:
            raise LedgerEntryInvalid(
                f"{where} belongs to collaboration {body.collab}, not {self.collaboration_id} (replayed?)"
            )
        if body.seen.seq >= seq:
            raise LedgerTampered(f"{where} claims to have seen entry {body.seen.seq}, which comes after it")
        signer_org = self._authorize(seq, entry, body, where)
        if signer_org is None:
            return
        if self._hashes[body.seen.seq] != body.seen.hash:
            raise LedgerForked(
                f"{where} was signed after its signer verified head {body.seen.short()}, but entry "
                f"{body.seen.seq} here hashes to {self._hashes[body.seen.seq][:12]}: the server showed "
                "different histories (a fork), or rewrote this one",
                body.seen.seq,
                self._hashes[body.seen.seq],
                body.seen.hash,
                where,
            )
        if body.at > self.last_signed.get(signer_org, 0):
            self.last_signed[signer_org] = body.at
        else:
            self.last_signed.setdefault(signer_org, 0)
        self._record(seq, entry, body)

    def _record(self, seq: int, entry: SignedEntry, body: Body) -> None:
        """Take in what a verified entry says."""
        digest = self._digest(entry)
        if isinstance(body, RunReceipt):  # the common case first (the kinds are disjoint)
            leases = self.leases
            for use in body.datasets:
                lease = leases.get(use.lease) if use.lease is not None else None
                if lease is not None:  # None: a lease on a dataset of an organization not pinned here
                    lease.runs += 1
                    lease.epsilon_spent += use.epsilon or 0.0
            self.receipts.append(Receipt(seq, digest, body))
        elif isinstance(body, DatasetRegistered):
            self.datasets[digest] = Dataset(
                digest, seq, body.org, body.label, body.description, body.content_hash, body.at
            )
        elif isinstance(body, LeaseGranted):
            lease = self.leases[digest] = Lease(
                digest, seq, self.datasets[body.dataset], body, body.expires_at
            )
            self._leases_to.setdefault((lease.owner, lease.dataset.label, lease.grantee), []).append(lease)
        elif isinstance(body, LeaseExtended):
            lease = self.leases[body.lease]
            lease.expires_at = body.expires_at
            lease.extensions.append((seq, body.expires_at))
        elif isinstance(body, LeaseRevoked):
            lease = self.leases[body.lease]
            if lease.revoked is None:
                lease.revoked, lease.revoked_seq = body, seq
        else:
            self.checkpoints.append((seq, body))

    def _authorize(self, seq: int, entry: SignedEntry, body: Body, where: str) -> int | None:
        """Check the entry's signer and references (nothing changes yet); the signing organization, or None
        when the entry counts for nothing here (its organization, or what it refers to, is not pinned)."""
        if isinstance(body, RunReceipt):
            for use in body.datasets:
                if use.lease is None or use.lease in self._skipped:
                    continue
                lease = self.leases.get(use.lease)
                if lease is None:
                    raise LedgerEntryInvalid(f"{where} names lease {use.lease[:12]}, not granted before it")
                if lease.body.owner != body.org:
                    raise LedgerEntryInvalid(
                        f"{where}: organization {body.org} reports a run on organization "
                        f"{lease.owner}'s lease"
                    )
        elif isinstance(body, _LEASE_BODIES):
            return self._authorize_lease(seq, entry, body, where)
        chain = self._chains.get(body.org)
        if chain is None:
            self._unverified(seq, entry, f"organization {body.org} is not pinned here")
            return None
        self._signed_by_org(seq, entry, chain, where)
        return body.org

    def _authorize_lease(
        self, seq: int, entry: SignedEntry, body: LeaseGranted | LeaseExtended | LeaseRevoked, where: str
    ) -> int | None:
        if isinstance(body, LeaseGranted):
            if body.dataset in self._skipped:
                self._unverified(seq, entry, "its dataset's organization is not pinned here")
                return None
            dataset = self.datasets.get(body.dataset)
            if dataset is None:
                raise LedgerEntryInvalid(
                    f"{where} names dataset {body.dataset[:12]}, not registered before it"
                )
            if dataset.org != body.owner:
                raise LedgerEntryInvalid(
                    f"{where}: dataset {dataset.label!r} belongs to organization {dataset.org}, "
                    f"not {body.owner}"
                )
            if body.expires_at <= body.not_before:
                raise LedgerEntryInvalid(f"{where} expires before it begins")
            owner = body.owner
        else:
            if body.lease in self._skipped:
                self._unverified(seq, entry, "its lease's organization is not pinned here")
                return None
            lease = self.leases.get(body.lease)
            if lease is None:
                raise LedgerEntryInvalid(f"{where} names lease {body.lease[:12]}, not granted before it")
            if isinstance(body, LeaseExtended) and lease.revoked is not None:
                raise LedgerEntryInvalid(f"{where} extends lease {lease.id[:12]}, which was revoked")
            owner = lease.owner
        if self._chains.get(owner) is None:
            self._unverified(seq, entry, f"organization {owner} is not pinned here")
            return None
        self._admin(seq, entry, owner, body.by.user, body.by.certificate, body.at, where)
        return owner

    def _unverified(self, seq: int, entry: SignedEntry, why: str) -> None:
        self._skipped.add(self._digest(entry))
        self.problems.append(Problem(seq, entry.kind, f"entry {seq} ({entry.kind}) not verified: {why}"))

    def _verified_by(self, seq: int, entry: SignedEntry, key: PublicKey) -> bool:
        done = self._preverified.get(seq)
        if callable(done):
            done = self._preverified[seq] = done()
        if done is not None and key.key_id in done:
            return True
        return self._signed_by(entry, key)

    def _signed_by_org(self, seq: int, entry: SignedEntry, chain: KeyChain, where: str) -> None:
        keys = self._chain_keys.get(chain.organization_id)
        if keys is None or keys[0] is not chain:
            by_id: dict[str, PublicKey] = {}
            for k in chain.keys:
                by_id.setdefault(k.key.key_id, k.key)  # the first, as chain.public finds it
            keys = self._chain_keys[chain.organization_id] = (chain, by_id)
        for sig in entry.sigs:
            key = keys[1].get(sig.key_id)
            if key is not None and self._verified_by(seq, entry, key):
                return
        raise LedgerEntryInvalid(
            f"{where} is not signed by a key of organization {chain.organization_id} (forged?)"
        )

    def _take_key_record(self, seq: int, entry: SignedEntry, where: str) -> None:
        org = entry.body.get("org")
        if not isinstance(org, int) or isinstance(org, bool):
            raise LedgerEntryInvalid(f"{where} names no organization")
        records = [*self._key_records.get(org, []), entry]
        pin = self._anchors(org)
        if pin is None and not self._tofu:
            self._key_records[org] = records
            self._unverified(seq, entry, f"organization {org} is not pinned here")
            return
        try:
            chain = verify_chain(org, records, pin)
        except TrustError as exc:
            raise LedgerEntryInvalid(f"{where}: {exc.message}") from None
        if pin is None and self._on_pin is not None:
            self._on_pin(org, chain.root.key_id)
        self._key_records[org] = records
        self._chains[org] = chain

    def _take_certificate(self, seq: int, entry: SignedEntry, where: str) -> None:
        org = entry.body.get("org")
        if not isinstance(org, int) or isinstance(org, bool):
            raise LedgerEntryInvalid(f"{where} names no organization")
        chain = self._chains.get(org)
        if chain is None:
            self._unverified(seq, entry, f"organization {org} is not pinned here")
            return
        self._signed_by_org(seq, entry, chain, where)
        if entry.kind == KIND_CERTIFICATE:
            self._certificates.setdefault(org, []).append(entry)
            self._holders.setdefault(org, []).append(_Holder(entry))
        else:
            digest = entry.body.get("certificate")
            if not isinstance(digest, str):
                raise LedgerEntryInvalid(f"{where} names no certificate")
            self._revoked.setdefault(org, set()).add(digest)

    def _admin(
        self, seq: int, entry: SignedEntry, org: int, by_user: int, by_cert: str, at: int, where: str
    ) -> None:
        """The entry is signed by a certified, unrevoked org admin of `org` (as of this place)."""
        chain = self._chains.get(org)
        if chain is None:
            raise LedgerEntryInvalid(f"{where}: organization {org} has no verified keys on this ledger")
        signers = set(entry.signers())
        for holder in self._holders.get(org, []):
            if holder.key is None or holder.key.key_id not in signers:
                continue
            try:
                cert = holder.verify(chain, self._revoked.get(org, set()), now=at, skew_s=self.skew_s)
            except TrustError as exc:
                raise LedgerEntryInvalid(
                    f"{where}: the signer's certificate does not hold: {exc.message}"
                ) from None
            if ADMIN_ROLE not in cert.roles:
                raise LedgerEntryInvalid(
                    f"{where} is signed by user {cert.user_id} of organization {org}, whose certificate has "
                    f"roles {', '.join(cert.roles) or 'none'}: only an org admin ({ADMIN_ROLE}) may sign it"
                )
            if cert.user_id != by_user or cert.digest != by_cert:
                raise LedgerEntryInvalid(
                    f"{where} names another admin or certificate than the one who signed it"
                )
            if not self._verified_by(seq, entry, cert.key):
                raise LedgerEntryInvalid(f"{where}: the admin's signature does not verify (forged?)")
            return
        if any(chain.public(k) is not None for k in signers):
            raise LedgerEntryInvalid(
                f"{where} is signed with organization {org}'s own key; lease entries are signed by a "
                f"certified org admin ({ADMIN_ROLE})"
            )
        raise LedgerEntryInvalid(
            f"{where} is not signed by a certified org admin of organization {org} (forged?)"
        )

    # -- what it says ---------------------------------------------------------------------------------------
    def chain(self, organization_id: int) -> KeyChain | None:
        return self._chains.get(organization_id)

    def certificates(self, organization_id: int) -> list[SignedEntry]:
        return list(self._certificates.get(organization_id, []))

    def dataset(self, owner: int, label: str) -> Dataset | None:
        """The latest registration of `label` by `owner`."""
        found = [d for d in self.datasets.values() if d.org == owner and d.label == label]
        return max(found, key=lambda d: d.seq) if found else None

    def leases_on(self, owner: int, label: str) -> list[Lease]:
        return sorted(
            (x for x in self.leases.values() if x.owner == owner and x.dataset.label == label),
            key=lambda x: x.seq,
        )

    def leases_for(
        self,
        *,
        owner: int,
        label: str,
        grantee: int,
        user: int | None,
        images: Iterable[str],
        now: float,
    ) -> list[Lease]:
        """Leases whose terms cover such a run now, oldest first; NoValidLease (with every reason) if none."""
        images = list(images)
        # Only the grantee's leases can cover the run or say why not; revoked, expired and not yet valid ones
        # are refused, and their reasons are written only when none covers it.
        candidates = self._leases_to.get((owner, label, grantee), [])
        good = [
            x
            for x in candidates
            if x.revoked is None
            and x.body.not_before <= now < x.expires_at
            and x.refusal(grantee=grantee, user=user, images=images, now=now) is None
        ]
        if good:
            return good
        reasons = [
            why
            for x in candidates
            if (why := x.refusal(grantee=grantee, user=user, images=images, now=now)) is not None
        ]
        if not reasons:
            raise NoValidLease(
                f"dataset {label!r} of organization {owner} has no lease for organization {grantee}"
            )
        raise NoValidLease(f"dataset {label!r}: " + "; ".join(reasons))

    def expiring(self, owner: int | None, within_s: float, now: float) -> list[Lease]:
        return [
            x
            for x in self.leases.values()
            if (owner is None or x.owner == owner)
            and x.status(now) == "active"
            and x.expires_at - now <= within_s
        ]

    def receipts_for(self, organization_id: int | None = None) -> list[Receipt]:
        return [r for r in self.receipts if organization_id is None or r.body.org == organization_id]


def check_entry_form(entry: SignedEntry) -> None:
    """The checks anyone can make without the ledger (the server's, before it appends)."""
    try:
        if entry.kind in (KIND_GENESIS, KIND_ROTATION, KIND_CERTIFICATE, KIND_REVOCATION):
            return
        parse_body(entry)
    except MalformedEntry as exc:
        raise LedgerEntryInvalid(exc.message) from None


__all__ = [
    "KIND_CHECKPOINT",
    "KIND_DATASET",
    "KIND_EXTEND",
    "KIND_LEASE",
    "KIND_RECEIPT",
    "KIND_REVOKE",
    "Dataset",
    "Lease",
    "LedgerState",
    "Problem",
    "Receipt",
    "check_entry_form",
]
