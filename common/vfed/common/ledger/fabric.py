"""The ledger on Hyperledger Fabric: the same `Ledger` interface as the embedded backend, kept by the
collaboration's organizations on a Fabric channel where the chaincode in chaincode/ applies the ledger's
checks at endorsement (no single party orders or admits entries).

Configured like any Fabric application: a standard common connection profile (JSON or YAML: peers, orderers,
channels, TLS CA files) and the organization's Fabric identity (MSP id, X.509 certificate and private key,
e.g. from cryptogen's `users/User1@.../msp`). Verifiers trust nothing this returns: `read`'s records are
checked by `LedgerState` exactly as the embedded backend's are.

hfc (fabric-sdk-py 1.0.0, the `fabric` extra) is the Fabric client, and it stays inside this module. It was
written for Fabric 1.4; tested here against Fabric 2.5.12 (docs/ledger.md), its proposal, broadcast and
filtered-deliver calls work as they are. Its `chaincode_invoke` does not: it returns a refusal's message as if
it were the chaincode's answer, submits endorsements without comparing them and sleeps on the event loop, so
this module drives the same building blocks itself: it compares every endorsement, raises typed errors and
waits for the commit on a block stream it keeps open, which also tells listeners (the node's lease cache) of
every new block. Chaincode lifecycle (install, approve, commit) is left to the `peer` CLI.
hfc's gRPC channels belong to the event loop that made them: a `FabricLedger` connects on first use, in the
running loop, and `close()` releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vfed.common.ledger.backend import READ_LIMIT, records_of
from vfed.common.ledger.chain import Head, Record
from vfed.common.ledger.errors import LedgerEntryExists, LedgerEntryInvalid, LedgerTampered
from vfed.common.ledger.fabric_settings import FabricSettings, FabricUnavailable, Profile
from vfed.common.trust.entries import SignedEntry

__all__ = ["FabricLedger", "FabricSettings", "FabricUnavailable"]

log = logging.getLogger("vfed.ledger.fabric")

VALID = "VALID"
RETRIED_CODES = frozenset({"MVCC_READ_CONFLICT", "PHANTOM_READ_CONFLICT"})
"""Validation codes of a transaction that lost a race with another append: it is endorsed again."""
MAX_ATTEMPTS = 8
_REPEATED = re.compile(r"repeats entry \d+ \(replayed\)")
"""How the chaincode (chaincode/lib/ledger.js) refuses an entry whose digest is on the ledger already."""


class FabricLedger:
    """One collaboration's ledger on its Fabric channel (the `Ledger` protocol)."""

    def __init__(self, settings: FabricSettings, collaboration_id: int) -> None:
        self.settings = settings
        self.collaboration_id = collaboration_id
        self._profile = Profile(settings)
        self._hfc: _Hfc | None = None
        self._appending = asyncio.Lock()

    async def _client(self) -> _Hfc:
        """hfc's objects, made on first use inside the running loop (their gRPC channels belong to it)."""
        if self._hfc is None:
            self._hfc = _Hfc(self.settings, self._profile)
        return self._hfc

    async def close(self) -> None:
        if self._hfc is not None:
            hfc, self._hfc = self._hfc, None
            await hfc.close()

    async def append(self, entry: SignedEntry) -> Head:
        hfc = await self._client()
        # Every append reads and writes the chain's head, so two in one block conflict and one is endorsed
        # again: this client's own appends wait for each other instead (other clients' are retried).
        async with self._appending:
            payload = await hfc.submit("Append", [entry.to_json()])
        try:
            answer = json.loads(payload)
            return Head(seq=int(answer["seq"]), hash=str(answer["hash"]))
        except (ValueError, KeyError, TypeError, ValidationError):
            raise LedgerTampered("the peers' answer to an append names no place on the ledger") from None

    async def read(self, after: int, limit: int = READ_LIMIT) -> list[Record]:
        hfc = await self._client()
        payload = await hfc.evaluate("Read", [str(after), str(limit)])
        try:
            answer = json.loads(payload)
        except ValueError:
            raise LedgerTampered("the peer's ledger answer is not JSON") from None
        return records_of(answer, after, "the peer")

    async def head(self) -> Head:
        """The head as the query peer's chaincode reports it (unverified: `LedgerState` decides)."""
        hfc = await self._client()
        try:
            answer = json.loads(await hfc.evaluate("Head", []))
            return Head(seq=int(answer["seq"]), hash=str(answer["hash"]))
        except (ValueError, KeyError, TypeError, ValidationError):
            raise LedgerTampered("the peer's answer names no ledger head") from None

    async def height(self) -> int:
        """The channel's block height on the query peer."""
        return await (await self._client()).height()

    async def on_block(self, listener: Callable[[int], None]) -> Callable[[], None]:
        """Call `listener(block_number)` for every block the query peer commits from now on (the node's lease
        cache refreshes on it); returns the function that removes it."""
        hfc = await self._client()
        hfc.listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                hfc.listeners.remove(listener)

        return remove


class _Hfc:
    """hfc's objects for one event loop: peers, orderers, the signing user, and a filtered block stream from
    the query peer that settles commit waiters and tells listeners."""

    def __init__(self, settings: FabricSettings, profile: Profile) -> None:
        # hfc imported here only: the `fabric` extra is optional, and its protobufs load on first use.
        from hfc.fabric.client import Client
        from hfc.fabric.orderer import Orderer
        from hfc.fabric.peer import Peer
        from hfc.fabric.user import create_user
        from hfc.util.keyvaluestore import FileKeyValueStore

        self.settings = settings
        self.client = Client()
        # hfc's gRPC (aiogrpc) waits for every answer and every streamed block on a thread; on the loop's
        # default pool, a few open block streams would hold every thread and stall all else that uses it
        # (asyncio.to_thread included). This ledger's calls get threads of their own, and each stream its own.
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vfed-fabric")
        self.peers: dict[str, Any] = {}
        for name, (address, ca, host) in profile.peers.items():
            peer = Peer(name=name, endpoint=address, tls_ca_cert_file=ca, opts=_options(host))
            self._rewire(peer, address, ca, host)
            self.peers[name] = peer
        self.client._peers = dict(self.peers)
        self.client._orderers = {}
        for name, (address, ca, host) in profile.orderers.items():
            orderer = Orderer(name=name, endpoint=address, tls_ca_cert_file=ca, opts=_options(host))
            self._rewire(orderer, address, ca, host)
            self.client._orderers[name] = orderer
        self._store_dir = tempfile.TemporaryDirectory(prefix="vfed-hfc-")
        try:
            self.user = create_user(
                "vfed",
                settings.msp_id,
                FileKeyValueStore(self._store_dir.name),
                settings.msp_id,
                str(settings.private_key),
                str(settings.certificate),
            )
        except (OSError, ValueError) as exc:
            self._store_dir.cleanup()
            raise FabricUnavailable(f"cannot load the Fabric identity: {exc}") from None
        with contextlib.redirect_stdout(None):  # hfc prints each channel it makes
            self.channel = self.client.new_channel(settings.channel)
        endorsers = settings.endorsing_peers or profile.endorsers
        unknown = [name for name in endorsers if name not in self.peers]
        if unknown or not endorsers:
            raise FabricUnavailable(f"no such endorsing peers in the connection profile: {unknown or 'none'}")
        self.endorsers = [self.peers[name] for name in endorsers]
        query = settings.query_peer or (profile.own_peers[0] if profile.own_peers else None)
        if query is None or query not in self.peers:
            raise FabricUnavailable(
                f"no query peer: name one (query_peer) or list a peer of {settings.msp_id} in the profile"
            )
        self.query_peer = self.peers[query]
        self.listeners: list[Callable[[int], None]] = []
        self._waiters: dict[str, asyncio.Future[str]] = {}
        self._stream: asyncio.Task[None] | None = None
        self._hub: Any = None
        self._first_block: asyncio.Future[int] | None = None

    def _rewire(self, node: Any, address: str, ca: str | None, host: str | None) -> None:
        """Give an hfc Peer or Orderer a gRPC channel on this ledger's threads (hfc made one on the default
        pool) and its service stubs on that channel."""
        import aiogrpc
        from hfc.protos.discovery import protocol_pb2_grpc
        from hfc.protos.orderer import ab_pb2_grpc
        from hfc.protos.peer import events_pb2_grpc, peer_pb2_grpc

        node._channel._channel.close()  # never used: its replacement is made before any call
        options = _options(host)
        if ca is None:
            node._channel = aiogrpc.insecure_channel(
                address, options, executor=self._threads, standalone_pool_for_streaming=True
            )
        else:
            credentials = aiogrpc.ssl_channel_credentials(Path(ca).read_bytes())
            node._channel = aiogrpc.secure_channel(
                address, credentials, options, executor=self._threads, standalone_pool_for_streaming=True
            )
        if hasattr(node, "_orderer_client"):
            node._orderer_client = ab_pb2_grpc.AtomicBroadcastStub(node._channel)
        else:
            node._endorser_client = peer_pb2_grpc.EndorserStub(node._channel)
            node._discovery_client = protocol_pb2_grpc.DiscoveryStub(node._channel)
            node._event_client = events_pb2_grpc.DeliverStub(node._channel)

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._stream
            self._stream = None
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(FabricUnavailable("the Fabric ledger was closed"))
        self._waiters.clear()
        for node in [*self.peers.values(), *self.client._orderers.values()]:
            with contextlib.suppress(Exception):
                await node._channel.close()
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._store_dir.cleanup()

    # -- proposals -------------------------------------------------------------------------------------------
    def _proposal(
        self, fcn: str, args: Sequence[str], peers: Sequence[Any]
    ) -> tuple[Any, list[Any], Any, Any]:
        from hfc.fabric.transaction.tx_context import create_tx_context
        from hfc.fabric.transaction.tx_proposal_request import CC_INVOKE, create_tx_prop_req

        request = create_tx_prop_req(
            prop_type=CC_INVOKE, cc_name=self.settings.chaincode, fcn=fcn, args=list(args)
        )
        context = create_tx_context(self.user, self.user.cryptoSuite, request)
        responses, proposal, header = self.channel.send_tx_proposal(context, list(peers))
        return context, responses, proposal, header

    async def _endorse(
        self, fcn: str, args: Sequence[str], peers: Sequence[Any]
    ) -> tuple[Any, list[Any], Any, Any]:
        context, calls, proposal, header = self._proposal(fcn, args, peers)
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), self.settings.timeout_s
            )
        except TimeoutError:
            raise FabricUnavailable(f"no endorsement within {self.settings.timeout_s:.0f} s") from None
        good: list[Any] = []
        refusals: list[str] = []
        unreachable: list[str] = []
        for peer, answer in zip(peers, answers, strict=True):
            if isinstance(answer, BaseException):
                unreachable.append(f"{peer.name}: {_grpc_reason(answer)}")
            elif answer.response.status != 200:
                refusals.append(f"{peer.name}: {answer.response.message}")
            else:
                good.append(answer)
        if refusals:
            message = "the Fabric peers refused it: " + "; ".join(refusals)
            if all(_REPEATED.search(text) for text in refusals):  # the chaincode's words for a known digest
                raise LedgerEntryExists(message)
            raise LedgerEntryInvalid(message)
        if not good:
            raise FabricUnavailable("no peer endorsed it: " + "; ".join(unreachable))
        if unreachable:
            log.warning("Fabric peers did not answer (endorsed without them): %s", "; ".join(unreachable))
        return context, good, proposal, header

    async def evaluate(self, fcn: str, args: Sequence[str]) -> str:
        """Run a read-only transaction on the query peer; its answer (nothing is ordered)."""
        _, good, _, _ = await self._endorse(fcn, args, [self.query_peer])
        return _payload(good[0])

    async def submit(self, fcn: str, args: Sequence[str]) -> str:
        """Endorse on every endorsing peer, order the transaction and wait until the query peer committed it
        as valid; the chaincode's answer. Lost races (MVCC conflicts with another append) are endorsed
        again."""
        await self._ensure_stream()
        for attempt in range(1, MAX_ATTEMPTS + 1):
            context, good, proposal, header = await self._endorse(fcn, args, self.endorsers)
            chosen = _agreeing(good)
            waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._waiters[context.tx_id] = waiter
            try:
                await self._broadcast(good if chosen is None else chosen, proposal, header)
                try:
                    code = await asyncio.wait_for(waiter, self.settings.timeout_s)
                except TimeoutError:
                    raise FabricUnavailable(
                        f"transaction {context.tx_id[:12]} was not committed within "
                        f"{self.settings.timeout_s:.0f} s"
                    ) from None
            finally:
                self._waiters.pop(context.tx_id, None)
            if code == VALID:
                return _payload((good if chosen is None else chosen)[0])
            if code in RETRIED_CODES and attempt < MAX_ATTEMPTS:
                await asyncio.sleep(random.uniform(0.02, 0.1) * attempt)  # apart from the one it lost to
                continue
            raise LedgerEntryInvalid(f"the Fabric peers did not commit it: transaction {code}")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _broadcast(self, endorsed: list[Any], proposal: Any, header: Any) -> None:
        from hfc.fabric.transaction.tx_context import create_tx_context
        from hfc.util import utils

        request = utils.build_tx_req((endorsed, proposal, header))
        context = create_tx_context(self.user, self.user.cryptoSuite, request)
        try:
            async for answer in utils.send_transaction(self.client._orderers, request, context):
                if answer.status != 200:
                    raise FabricUnavailable(
                        f"the orderer refused the transaction: {answer.status} {answer.info}"
                    )
        except FabricUnavailable:
            raise
        except Exception as exc:
            raise FabricUnavailable(f"the orderer could not be reached: {_grpc_reason(exc)}") from None

    # -- blocks ----------------------------------------------------------------------------------------------
    async def height(self) -> int:
        from hfc.fabric.transaction.tx_context import create_tx_context
        from hfc.fabric.transaction.tx_proposal_request import CC_QUERY, create_tx_prop_req
        from hfc.protos.common import ledger_pb2

        request = create_tx_prop_req(
            prop_type=CC_QUERY, fcn="GetChainInfo", cc_name="qscc", args=[self.settings.channel]
        )
        context = create_tx_context(self.user, self.user.cryptoSuite, request)
        calls, _, _ = self.channel.send_tx_proposal(context, [self.query_peer])
        try:
            (answer,) = await asyncio.wait_for(asyncio.gather(*calls), self.settings.timeout_s)
        except Exception as exc:
            raise FabricUnavailable(
                f"the query peer did not report its height: {_grpc_reason(exc)}"
            ) from None
        if answer.response.status != 200:
            raise FabricUnavailable(f"the query peer did not report its height: {answer.response.message}")
        info = ledger_pb2.BlockchainInfo()
        info.ParseFromString(answer.response.payload)
        return int(info.height)

    async def _ensure_stream(self) -> None:
        if self._stream is not None and not self._stream.done():
            if self._first_block is not None:
                await asyncio.wait_for(asyncio.shield(self._first_block), self.settings.timeout_s)
            return
        start = await self.height()
        self._first_block = asyncio.get_running_loop().create_future()
        self._stream = asyncio.create_task(self._follow(start))
        try:
            await asyncio.wait_for(asyncio.shield(self._first_block), self.settings.timeout_s)
        except TimeoutError:
            raise FabricUnavailable("the query peer's block stream did not start") from None

    async def _follow(self, start: int) -> None:
        """Blocks from `start - 1` on (the newest committed one first: once it arrives, the stream is live and
        no commit can be missed); reconnects from the last block seen when the stream ends."""
        last = max(start - 1, 0)
        delay = 0.2
        while True:
            hub = self.channel.newChannelEventHub(self.query_peer, self.user)
            hub.registerBlockEvent(unregister=False, onEvent=self._block)
            try:
                await hub.connect(filtered=True, start=last)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    hub.disconnect()
                raise
            except Exception as exc:
                log.warning(
                    "the Fabric block stream from %s ended: %s", self.query_peer.name, _grpc_reason(exc)
                )
            last = max(hub._last_seen or last, last)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _block(self, block: dict[str, Any]) -> None:
        number = int(block.get("number", 0))
        if self._first_block is not None and not self._first_block.done():
            self._first_block.set_result(number)
        for tx in block.get("filtered_transactions") or []:
            waiter = self._waiters.get(tx.get("txid"))
            if waiter is not None and not waiter.done():
                waiter.set_result(str(tx.get("tx_validation_code")))
        for listener in list(self.listeners):
            try:
                listener(number)
            except Exception:  # a listener's failure is its own
                log.exception("a Fabric block listener failed")


def _options(host: str | None) -> list[tuple[str, str]] | None:
    return [("grpc.ssl_target_name_override", host)] if host else None


def _payload(answer: Any) -> str:
    from hfc.fabric.block_decoder import decode_proposal_response_payload

    decoded = decode_proposal_response_payload(answer.payload)
    raw: bytes = decoded["extension"]["response"]["payload"]
    return raw.decode("utf-8")


def _agreeing(endorsed: list[Any]) -> list[Any] | None:
    """The largest group of endorsements with the same result, when the peers disagree (a peer runs other
    chaincode); None when they all agree. The committing peers judge whether that group meets the policy."""
    groups: dict[bytes, list[Any]] = {}
    for answer in endorsed:
        groups.setdefault(bytes(answer.payload), []).append(answer)
    if len(groups) == 1:
        return None
    best = max(groups.values(), key=len)
    log.warning(
        "Fabric peers disagree on a transaction's result (%d different results: a peer behind the others, or "
        "running other chaincode); submitting the %d that agree",
        len(groups),
        len(best),
    )
    return best


def _grpc_reason(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        with contextlib.suppress(Exception):
            return str(details())
    return str(exc) or type(exc).__name__
