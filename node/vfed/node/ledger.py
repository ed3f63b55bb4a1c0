"""The node's verified view of its collaboration's ledger (`vfed.common.ledger`), for the agent and the
operator CLIs alike.

Organization keys are anchored in the node's trust store (its own organization by its key file's first key;
`trust: tofu` pins others at first sight). What was verified is kept in `ledger.sqlite3` in the node's data
folder, with every head others claimed to have verified, so a restart verifies only what is new and
`vnode ledger verify` can compare every head seen.

    async with aiohttp.ClientSession() as session:
        ledger = await NodeLedger.connect(settings, session)
        await ledger.sync()
        ledger.state.leases_on(ledger.organization_id, "patients")
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp

from vfed.common.crypto import Keyring
from vfed.common.ledger import (
    EmbeddedLedger,
    Head,
    Ledger,
    LedgerError,
    LedgerForked,
    LedgerState,
    LedgerView,
    Receipt,
    Record,
    VerifyReport,
)
from vfed.common.trust import SignedEntry, TrustMode, TrustStore
from vfed.common.trust.keychain import record_key
from vfed.node import sqlite_file
from vfed.node.config import NodeSettings
from vfed.node.lease_store import LeaseStore
from vfed.node.metrics import NodeMetrics
from vfed.node.server_api import NodeClient
from vfed.node.trust import NodeTrustStore

log = logging.getLogger(__name__)


def backend_for(settings: NodeSettings, client: NodeClient, collaboration_id: int) -> Ledger:
    """The ledger backend the node's configuration names (`ledger.backend`)."""
    fabric = settings.ledger.fabric
    if settings.ledger.backend == "fabric" and fabric is not None:
        from vfed.common.ledger.fabric import FabricLedger

        return FabricLedger(fabric, collaboration_id)
    return EmbeddedLedger(client, collaboration_id)


LEDGER_FILE = "ledger.sqlite3"
EXPIRING_WITHIN_S = 7 * 86400.0
"""Leases expiring sooner than this are counted in `vfed_node_leases_expiring` (and shown as expiring)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    collab INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT,
    entry TEXT NOT NULL,
    PRIMARY KEY (collab, seq)
);
CREATE TABLE IF NOT EXISTS heads (
    collab INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    source TEXT NOT NULL,
    seen_at REAL NOT NULL,
    PRIMARY KEY (collab, seq, hash, source)
);
"""


class SqliteCopy:
    """A `LocalCopy` in one SQLite file: the records verified here and the heads others verified. The
    node's own disk is trusted; a copy lost or removed is read and verified again from the server."""

    def __init__(self, path: Path, collaboration_id: int) -> None:
        self.path = path
        self.collaboration_id = collaboration_id
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite_file.connect(self.path, _SCHEMA)  # a record lost in a power cut is read again
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def load(self) -> list[Record]:
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT seq, hash, entry FROM records WHERE collab = ? ORDER BY seq",
                    (self.collaboration_id,),
                )
                .fetchall()
            )
        records = []
        for number, (seq, claimed, entry) in enumerate(rows, 1):
            if seq != number:  # a gap: keep the prefix, the rest is read again
                break
            records.append(Record(int(seq), SignedEntry.parse(entry), claimed))
        return records

    def save(self, records: Sequence[Record]) -> None:
        rows = [(self.collaboration_id, r.seq, r.hash, r.entry.to_json()) for r in records]
        with self._lock:
            db = self._conn()
            db.execute("BEGIN")
            db.executemany(
                "INSERT OR REPLACE INTO records (collab, seq, hash, entry) VALUES (?, ?, ?, ?)", rows
            )
            db.execute("COMMIT")

    def clear(self) -> None:
        """Forget the verified records (the heads stay: they are what a fresh verification is held to)."""
        with self._lock:
            self._conn().execute("DELETE FROM records WHERE collab = ?", (self.collaboration_id,))

    def heads(self) -> list[tuple[Head, str]]:
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT seq, hash, source FROM heads WHERE collab = ? ORDER BY seq, seen_at",
                    (self.collaboration_id,),
                )
                .fetchall()
            )
        return [(Head(seq=int(seq), hash=str(h)), str(source)) for seq, h, source in rows]

    def remember_head(self, head: Head, source: str) -> None:
        with self._lock:
            self._conn().execute(
                "INSERT OR IGNORE INTO heads (collab, seq, hash, source, seen_at) VALUES (?, ?, ?, ?, ?)",
                (self.collaboration_id, head.seq, head.hash, source, time.time()),
            )


class NodeLedger:
    """One collaboration's ledger as this node verified it. No I/O in the constructor: `open()` (or
    `connect()`) loads the local copy; `sync()` reads and verifies what is new."""

    def __init__(
        self,
        settings: NodeSettings,
        client: NodeClient,
        *,
        organization_id: int,
        collaboration_id: int,
        store: TrustStore,
        metrics: NodeMetrics | None = None,
        leases: LeaseStore | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.organization_id = organization_id
        self.collaboration_id = collaboration_id
        self.store = store
        self.metrics = metrics
        self.copy = SqliteCopy(settings.data_dir / LEDGER_FILE, collaboration_id)
        self.view = LedgerView(backend_for(settings, client, collaboration_id), self._new_state, self.copy)
        self.leases = leases
        """Where the runs of verified receipts are counted against their leases (the agent's store; None in
        the operator CLIs)."""
        self._fed = 0

    @classmethod
    async def connect(cls, settings: NodeSettings, session: aiohttp.ClientSession) -> NodeLedger:
        """For the operator CLIs: log in with the node's API key, anchor at its key file, load the copy."""
        from vfed.node.keys import passphrase

        client = NodeClient(session, settings.server_url, settings.api_key.get_secret_value())
        identity = await client.login()
        keyring = await asyncio.to_thread(Keyring.load, settings.key_path, passphrase(settings))
        store = NodeTrustStore(settings, identity.organization_id, keyring.keys[0].public)
        ledger = cls(
            settings,
            client,
            organization_id=identity.organization_id,
            collaboration_id=identity.collaboration_id,
            store=store,
        )
        await ledger.open()
        return ledger

    def _new_state(self) -> LedgerState:
        def anchor(organization_id: int) -> str | None:
            pin = self.store.get(organization_id)
            return pin.root if pin is not None else None

        def on_pin(organization_id: int, key_id: str) -> None:
            self.store.pin(organization_id, key_id, note="pinned at first use (ledger)")
            log.info("organization %s pinned at first use from the ledger", organization_id)

        return LedgerState(
            self.collaboration_id,
            anchors=anchor,
            tofu=self.store.mode == TrustMode.TOFU,
            on_pin=on_pin,
            skew_s=self.settings.descriptor_skew_s,
        )

    # -- reading -------------------------------------------------------------------------------------------
    @property
    def state(self) -> LedgerState:
        return self.view.state

    @property
    def head(self) -> Head:
        return self.view.head

    @property
    def length(self) -> int:
        return self.view.state.length

    async def open(self) -> None:
        """Take in the local copy; a copy that no longer verifies here (pins changed) is read again."""
        try:
            await asyncio.to_thread(self.view.load)
        except LedgerError as exc:
            log.warning(
                "the local ledger copy %s does not verify (%s); reading it again",
                self.copy.path,
                exc,
            )
            self.copy.clear()
            self.view = LedgerView(self.view.backend, self._new_state, self.copy)
            self._fed = 0
            await asyncio.to_thread(self.view.load)
        # The receipts the lease store lacks (all of them for a new store), fed off the loop.
        await asyncio.to_thread(self._feed_quietly)
        self._after_change()

    async def sync(self) -> int:
        """Read and verify what is new; how many entries were. LedgerError (LedgerForked counted and logged)
        when the ledger does not verify; ApiError/ServerUnavailable when it cannot be read."""
        try:
            added = await self.view.sync()
        except LedgerForked as exc:
            self._forked(exc)
            raise
        finally:
            self._after_change()
        return added

    async def ensure_head(self, head: Head, source: str) -> None:
        """`head` (verified by `source`) is on this node's chain; LedgerForked (counted, logged) if not."""
        try:
            await self.view.ensure_head(head, source)
        except LedgerForked as exc:
            self._forked(exc)
            raise
        finally:
            self._after_change()

    async def verify_full(self) -> VerifyReport:
        """Read the whole ledger afresh and verify it against this node's chain and every head it saw."""
        try:
            return await self.view.verify_full()
        except LedgerForked as exc:
            self._forked(exc)
            raise

    async def append(self, entry: SignedEntry) -> Head:
        """Append a signed entry and confirm it is on the verified chain where the server put it."""
        try:
            return await self.view.append(entry)
        finally:
            self._after_change()

    def close(self) -> None:
        self.copy.close()

    async def aclose(self) -> None:
        """`close`, and the backend's connections (a Fabric ledger's gRPC channels and block stream)."""
        closer = getattr(self.view.backend, "close", None)
        if closer is not None:
            await closer()
        self.close()

    async def on_change(self, listener: Callable[[], None]) -> bool:
        """Call `listener` whenever the backend says the ledger grew (a Fabric block); False when the backend
        has no such signal (the embedded ledger: the server's `ledger` doorbell says it instead)."""
        subscribe = getattr(self.view.backend, "on_block", None)
        if subscribe is None:
            return False
        await subscribe(lambda _block: listener())
        return True

    async def publish_keys(self, records: Sequence[SignedEntry]) -> int:
        """Append this organization's key records the ledger lacks, in order (a Fabric ledger: the server
        carries them onto the embedded one); how many were appended."""
        await self.sync()
        chain = self.state.chain(self.organization_id)
        known = {k.key.key_id for k in chain.keys} if chain is not None else set()
        added = 0
        for record in records:
            if record_key(record).key_id in known:
                continue
            await self.append(record)
            added += 1
        return added

    # -- what the node asks ---------------------------------------------------------------------------------
    def feed_receipts(self) -> None:
        """Count the runs of the receipts verified since the last call in `leases` (only the new ones; the
        store ignores a run it knows from the ledger). After a restart, the receipts the store took in
        before on this same chain are skipped. A failure leaves them for the next call."""
        receipts = self.state.receipts
        if self.leases is None or self._fed >= len(receipts):
            return
        start = self._fed or self._fed_before(self.leases, receipts)
        end = len(receipts)
        if start >= end:  # a restart: the store has them all
            self._fed = end
            return
        last = receipts[end - 1]
        self.leases.add_ledger_runs(
            (
                (use.lease, receipt.body.run, use.epsilon)
                for receipt in receipts[start:end]
                for use in receipt.body.datasets
                if use.lease is not None
            ),
            mark=(self._fed_key, f"{end} {last.seq} {self.state.hash_at(last.seq)}"),
        )
        self._fed = end

    @property
    def _fed_key(self) -> str:
        return f"ledger_receipts_fed:{self.collaboration_id}"

    def _fed_before(self, leases: LeaseStore, receipts: Sequence[Receipt]) -> int:
        """How many of `receipts` the store took in before: the count it noted, if the receipt it noted last
        is at the same place of the same chain (same chain hash) here."""
        noted = (leases.meta(self._fed_key) or "").split()
        if len(noted) != 3 or not noted[0].isdigit() or not noted[1].isdigit():
            return 0
        count, seq, chain_hash = int(noted[0]), int(noted[1]), noted[2]
        if not 0 < count <= len(receipts) or receipts[count - 1].seq != seq:
            return 0
        return count if self.state.hash_at(seq) == chain_hash else 0

    def _feed_quietly(self) -> None:
        try:
            self.feed_receipts()
        except sqlite3.Error as exc:  # retried before the next reservation (LeaseGuard.reserve)
            log.error("the runs of new receipts could not be counted in the lease store (%s)", exc)

    def _after_change(self) -> None:
        self._feed_quietly()
        if self.metrics is not None:
            self.metrics.ledger_length.set(self.state.length)
            expiring = self.state.expiring(self.organization_id, EXPIRING_WITHIN_S, time.time())
            self.metrics.leases_expiring.set(len(expiring))

    def _forked(self, exc: LedgerForked) -> None:
        if self.metrics is not None:
            self.metrics.ledger_forks.inc()
        ours = self.state.hash_at(exc.seq) if exc.ours is None else exc.ours
        log.error(
            "ledger fork in collaboration %s at entry %s: this node's chain has %s, %s verified %s: %s",
            self.collaboration_id,
            exc.seq,
            (ours or "nothing")[:16],
            exc.source or "another verifier",
            (exc.theirs or "nothing")[:16],
            exc.message,
        )
