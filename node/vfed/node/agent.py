"""The node agent: start-up, then a loop of doorbell-or-poll -> claim -> run, at most N runs at once.

`async with Agent(settings) as agent: await agent.run()`. `run(burst=True)` returns once nothing is pending
or running, so tests drive the real loop to completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType

import aiohttp

from vfed.common import tls
from vfed.common.api.doorbell import Ring
from vfed.common.api.errors import ApiError
from vfed.common.api.statuses import RunStatus
from vfed.common.crypto import CryptoError
from vfed.common.ledger import LedgerError
from vfed.common.secret_file import SecretFileError, read_secret_file
from vfed.common.trust import records_for_keys
from vfed.node import timeline
from vfed.node.config import NodeSettings
from vfed.node.data_dir import UnsafeDataDir, secure_data_dir
from vfed.node.doorbell import Doorbell, claim_delay_s
from vfed.node.journal import Journal, Stage
from vfed.node.keys import KeyHolder, KeyMismatch, load_or_create, passphrase, publish_chain, reconcile
from vfed.node.lease_store import LEASES_FILE, LeaseStore
from vfed.node.leases import LeaseGuard
from vfed.node.ledger import NodeLedger
from vfed.node.metrics import NodeMetrics, serve_metrics
from vfed.node.orphans import adopt_server, server_identity
from vfed.node.policy import ALLOWS_EVERY_IMAGE, allows_every_image
from vfed.node.privacy import BudgetStore
from vfed.node.receipts import Receipts
from vfed.node.recovery import Resume, recover
from vfed.node.runner import Runner, Services
from vfed.node.runtime import registry
from vfed.node.runtime.base import Runtime
from vfed.node.server_api import NodeClient, NodeIdentity
from vfed.node.trust import NodeTrustStore, RunChecks, node_resolver
from vfed.proxy.listener import ProxyListener
from vfed.proxy.rest import ServerUnavailable

log = logging.getLogger(__name__)

KEY_FILE_POLL_S = 2.0
"""How often the agent looks at its key file's modification time (a rotation is picked up without restart)."""


class AgentStartError(Exception):
    """The agent cannot start; the message says why and what to do."""


def _metrics_token(settings: NodeSettings) -> str | None:
    if settings.metrics_port is None or settings.metrics_token_file is None:
        return None
    return read_secret_file(settings.metrics_token_file, "metrics_token_file", min_length=16).strip()


class Agent:
    """One node's daemon. No I/O in the constructor; `async with` sets everything up."""

    def __init__(self, settings: NodeSettings, *, rotate_key: bool = False, runtime: Runtime | None = None):
        self.settings = settings
        self.rotate_key = rotate_key
        self.metrics = NodeMetrics()
        self.metrics_port: int | None = None
        self._runtime = runtime
        self._stack = AsyncExitStack()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._kills: dict[int, asyncio.Event] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._ring_checks: dict[tuple[str, int], asyncio.Task[None]] = {}  # rings the server is asked about
        self._semaphore = asyncio.Semaphore(settings.max_concurrent_runs)
        self._key_check = asyncio.Event()
        self._chain_behind = False  # the last reload's records did not reach the server yet
        self._tg: asyncio.TaskGroup | None = None
        self.services: Services | None = None
        self.runner: Runner | None = None
        self.doorbell: Doorbell | None = None

    async def __aenter__(self) -> Agent:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        for task in [*self._background, *self._ring_checks.values(), *self._tasks.values()]:
            task.cancel()
        await self._stack.aclose()

    def stop(self) -> None:
        """Ask the loop to return; containers keep running and are picked up again after a restart."""
        self._stopping.set()
        self._wake.set()

    async def _start(self) -> None:
        s = self.settings
        runtime = self._runtime or registry.build(s.runtime, s.data_dir)  # no I/O yet
        runtime.on_step = timeline.mark  # the engine's steps of a start join the run's timeline
        try:
            await asyncio.to_thread(secure_data_dir, s.data_dir)
            metrics_token = _metrics_token(s)
        except (UnsafeDataDir, SecretFileError) as exc:
            raise AgentStartError(str(exc)) from None
        try:
            to_server = tls.connector(s.server_ca_file)  # the runs' proxies share this session
        except tls.CaFileError as exc:
            raise AgentStartError(f"server_ca_file: {exc}") from None
        session = await self._stack.enter_async_context(
            aiohttp.ClientSession(
                connector=to_server,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
            )
        )
        client = NodeClient(session, s.server_url, s.api_key.get_secret_value())
        keyring, created = await asyncio.to_thread(load_or_create, s)
        if created:
            log.info("generated a new organization key at %s", s.key_path)
        identity = await self._login(client)
        await reconcile(s, client, keyring, identity.organization_id, rotate=self.rotate_key)
        holder = KeyHolder(s.key_path, passphrase(s), keyring)  # after a rotation at start, if any
        await self._stack.enter_async_context(runtime)
        listener = await self._proxy_listener(runtime)
        journal = Journal(s.data_dir / "journal.sqlite3")
        self._stack.callback(journal.close)
        store = NodeTrustStore(s, identity.organization_id, holder.root)
        chains = node_resolver(client, store)
        server_id = server_identity(identity, s.api_key.get_secret_value())
        ledger, guard = await self._leases(client, identity, store, holder, runtime)
        self.services = Services(
            settings=s,
            client=client,
            session=session,
            key_holder=holder,
            runtime=runtime,
            journal=journal,
            metrics=self.metrics,
            organization_id=identity.organization_id,
            collaboration_id=identity.collaboration_id,
            budget=BudgetStore(s.data_dir / "privacy.sqlite3"),
            chains=chains,
            checks=RunChecks(
                s, chains, journal, holder, identity.organization_id, identity.collaboration_id, server_id
            ),
            server_identity=server_id,
            ledger=ledger,
            leases=guard,
            listener=listener,
        )
        self.runner = Runner(self.services)
        if s.metrics_port is not None:
            runner, self.metrics_port = await serve_metrics(
                self.metrics, s.metrics_host, s.metrics_port, metrics_token
            )
            self._stack.push_async_callback(runner.cleanup)
        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        if allows_every_image(s):
            log.warning(ALLOWS_EVERY_IMAGE)
        # `vnode start` waits for this exact line (vfed.node.operator.container.ONLINE_RE): keep its shape.
        log.info("node %s (organization %s) started", identity.node_id, identity.organization_id)

    async def _proxy_listener(self, runtime: Runtime) -> ProxyListener | None:
        """The listener of runs that reach their proxy over a network (one per agent, a token per run)."""
        address = runtime.proxy_listen_address() if runtime.proxy_over_network else None
        if address is None:
            if runtime.proxy_over_network:
                log.warning("the %s runtime names no proxy service: runs have no way out", runtime.name)
            return None
        listener = ProxyListener(*address, head_timeout_s=self.settings.proxy_head_timeout_s)
        return await self._stack.enter_async_context(listener)

    async def _leases(
        self,
        client: NodeClient,
        identity: NodeIdentity,
        store: NodeTrustStore,
        holder: KeyHolder,
        runtime: Runtime,
    ) -> tuple[NodeLedger | None, LeaseGuard | None]:
        """With `leases: required`: the verified ledger (local copy, then what is new) and the lease guard."""
        s = self.settings
        if s.leases == "off":
            log.warning(
                "leases: off: runs are not checked against the collaboration's ledger and leave no receipts "
                "(set `leases: required` in the node's configuration)"
            )
            return None, None
        leases = LeaseStore(s.data_dir / LEASES_FILE)
        self._stack.callback(leases.close)
        ledger = NodeLedger(
            s,
            client,
            organization_id=identity.organization_id,
            collaboration_id=identity.collaboration_id,
            store=store,
            metrics=self.metrics,
            leases=leases,  # the runs of verified receipts are counted there as they are verified
        )
        self._stack.push_async_callback(ledger.aclose)
        await ledger.open()
        try:
            if s.ledger.backend == "fabric":  # the server carries key records onto its own ledger only
                published = await ledger.publish_keys(
                    records_for_keys(identity.organization_id, holder.keyring.keys)
                )
                if published:
                    log.info("published %d key record(s) on the Fabric ledger", published)
            added = await ledger.sync()
            log.info("ledger verified: %d entries (%d new)", ledger.length, added)
        except (ApiError, ServerUnavailable, LedgerError) as exc:
            log.error(
                "the ledger could not be verified at start (%s); runs on datasets are refused until it is",
                exc,
            )
        receipts = Receipts(ledger, leases, holder, self.metrics)
        guard = LeaseGuard(s, ledger, leases, receipts, runtime, self.metrics)
        try:  # a Fabric ledger says when it grew: revocations reach running runs without the server
            await ledger.on_change(guard.poke)
        except LedgerError as exc:
            log.error("the ledger's block events cannot be followed (%s); it is polled instead", exc)
        return ledger, guard

    async def _login(self, client: NodeClient) -> NodeIdentity:
        """Log in, waiting up to startup_timeout_s for a server that is still starting."""
        deadline = time.monotonic() + self.settings.startup_timeout_s
        delay = 0.5
        while True:
            try:
                return await client.login()
            except ApiError as exc:
                detail = exc.detail or exc.error
                raise AgentStartError(f"the server refused this node's api_key: {detail}") from None
            except ServerUnavailable as exc:
                refused = tls.explain(exc.__cause__, self.settings.server_ca_file) if exc.__cause__ else None
                if refused is not None:  # a certificate that does not verify will not start to
                    raise AgentStartError(refused) from None
                if time.monotonic() + delay > deadline:
                    raise AgentStartError(
                        f"the server at {self.settings.server_url} does not answer"
                    ) from None
                log.warning("server not reachable yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @property
    def _s(self) -> Services:
        assert self.services is not None, "use the agent inside `async with`"
        return self.services

    async def run(self, *, burst: bool = False) -> None:
        """Recover what a previous process left, then serve until stop() (or, in burst mode, until idle).

        stop() also cuts short what the loop is waiting for (a poll, recovery's reports): a server that does
        not answer must not hold up SIGTERM. Every step is journaled, so the next start picks it up.
        """
        serving = asyncio.ensure_future(self._serve(burst))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not serving.done():
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
        if not serving.cancelled():
            serving.result()  # the loop's own error, if any

    async def _serve(self, burst: bool) -> None:
        s = self._s
        await adopt_server(s, s.server_identity)  # a reset server's ids restart: clear its old runs first
        if s.leases is not None:  # runs still using leases are watched again; their receipts come after
            s.leases.resume({e.run_id for e in s.journal.unfinished()})
        await recover(s, self._runner_or_fail(), self._spawn_resumed)
        mqtt_url = self.settings.mqtt_url or await self._mqtt_from_server()
        if mqtt_url and s.client.identity is not None:
            node_id, ca = s.client.identity.node_id, self._broker_ca()
            self.doorbell = Doorbell(mqtt_url, node_id, self._on_ring, self._broker_credentials, ca)
            self._background.append(asyncio.create_task(self.doorbell.run(), name="doorbell"))
            # Subscribe first, then sync, so nothing published in between is missed (a broker that does not
            # answer in time only delays the doorbell: the poll below starts regardless).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.doorbell.connected.wait(), 2.0)
        self._background.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))
        self._background.append(asyncio.create_task(self._janitor(), name="janitor"))
        self._background.append(asyncio.create_task(self._watch_key_file(), name="key-file"))
        if s.leases is not None:
            guard = s.leases
            self._background.append(
                asyncio.create_task(guard.watch(self._kill, self._broker_up), name="leases")
            )
            self._background.append(asyncio.create_task(guard.receipts.run(), name="receipts"))
            self._background.append(asyncio.create_task(guard.receipts.checkpoints(), name="checkpoints"))
        backoff = self.settings.poll_interval_s
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                pending = await self._poll_once()
                backoff = self.settings.poll_interval_s
            except ServerUnavailable as exc:
                log.warning("server unreachable (%s); polling again later", exc)
                pending, backoff = -1, min(backoff * 2, max(self.settings.poll_interval_s, 15.0))
            if burst and pending == 0 and not self._tasks:
                return
            timeout = 0.2 if burst else backoff * random.uniform(0.8, 1.2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _heartbeat(self) -> None:
        """Keep the node online on the server even when the poll interval is long."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            with contextlib.suppress(ApiError, ServerUnavailable):
                await self._s.client.heartbeat()

    def reload_keys(self) -> None:
        """Read the key file again now (SIGHUP), whether or not its modification time changed."""
        self._key_check.set()

    async def _watch_key_file(self) -> None:
        """Pick up a rotated key file: from then on the new key is current; the old ones still decrypt."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._key_check.wait(), KEY_FILE_POLL_S)
            forced = self._key_check.is_set()
            self._key_check.clear()
            try:
                await self.check_key_file(force=forced)
            except Exception:  # the watcher never stops the agent
                log.exception("checking the key file failed")

    async def check_key_file(self, *, force: bool = False) -> bool:
        """Reload the keyring when the key file changed, publish its new chain records; True if reloaded."""
        s = self._s
        holder = s.key_holder
        reloaded = None
        if force or holder.changed():
            try:
                reloaded = await asyncio.to_thread(holder.reload)
            except (KeyMismatch, CryptoError, OSError) as exc:
                log.error("the key file %s changed but is not used: %s", holder.path, exc)
                return False
        if reloaded is not None:
            self.metrics.key_reloads.inc()
            s.chains.forget(s.organization_id)
            self._chain_behind = True
            log.info(
                "organization key file reloaded: current key %s (%d older kept)",
                reloaded.current.key_id,
                len(reloaded.keys) - 1,
            )
        if self._chain_behind:
            try:
                await publish_chain(s.client, holder.keyring, s.organization_id, key_path=holder.path)
                self._chain_behind = False
            except (ApiError, ServerUnavailable, KeyMismatch) as exc:
                log.warning("could not publish the new key records yet (%s); retrying", exc)
        return reloaded is not None

    async def _janitor(self) -> None:
        """Remove job volumes idle for longer than job_volume_retention_s (also those a crash left)."""
        idle_since: dict[str, float] = {}
        retention = self.settings.job_volume_retention_s
        # Without retention volumes go with their job's last run; the sweep only collects leftovers.
        every_s = 60.0 if retention == 0 else min(max(retention, 1.0), 60.0)
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(Exception):  # a janitor never stops the agent
                await self._sweep_volumes(idle_since)

    async def _sweep_volumes(self, idle_since: dict[str, float]) -> None:
        s = self._s
        busy = {str(e.job_id) for e in s.journal.unfinished()}
        now = time.monotonic()
        for job_id in await s.runtime.list_job_volumes(self.settings.name):
            if job_id in busy:
                idle_since.pop(job_id, None)
            elif now - idle_since.setdefault(job_id, now) >= self.settings.job_volume_retention_s:
                await s.runtime.remove_job_volume(self.settings.name, job_id)
                idle_since.pop(job_id, None)

    def _broker_credentials(self) -> tuple[str | None, str | None]:
        """The broker account from the last login (the server hands each node its own)."""
        identity = self._s.client.identity
        return (identity.broker_username, identity.broker_password) if identity else (None, None)

    def _broker_ca(self) -> Path | None:
        """The CA an `mqtts://` broker is checked with: mqtt_ca_file, else server_ca_file, else system CAs."""
        return self.settings.mqtt_ca_file or self.settings.server_ca_file

    async def _mqtt_from_server(self) -> str | None:
        """The broker the server announces at `GET /doorbell`, when the config names none."""
        try:
            answer = await self._s.client.request("GET", "/doorbell")
        except (ApiError, ServerUnavailable) as exc:
            log.warning("no doorbell address from the server (%s); polling only", exc)
            return None
        url = answer.get("url") if isinstance(answer, dict) else None
        return str(url) if url else None

    async def _poll_once(self) -> int:
        """Start every pending run of our organization we are not already handling; check kills."""
        s = self._s
        runs = await s.client.list_runs(organization_id=s.organization_id, status=RunStatus.PENDING)
        fresh = [r.id for r in runs if r.id not in self._tasks]
        for run_id in fresh:
            self._spawn(run_id)
        self._retry_journal()
        await self._check_server_kills()
        return len(fresh)

    def _retry_journal(self) -> None:
        """Finish runs whose last step failed because the server was away (the server answers again now)."""
        fin = self._runner_or_fail().finisher
        for entry in self._s.journal.unfinished():
            if entry.run_id in self._tasks or entry.stage == Stage.STARTED:
                continue
            log.info("run %s: retrying from journal stage %s", entry.run_id, entry.stage)
            if entry.stage == Stage.CLAIMED:
                reason = "the node lost the server before the container started"
                self._spawn_resumed(entry.run_id, _resume_as(fin.end_without_container, entry.run_id, reason))
            else:
                self._spawn_resumed(
                    entry.run_id, _resume_as(fin.complete, entry.run_id, entry.job_id, entry.handle)
                )

    async def _check_server_kills(self) -> None:
        for run_id in list(self._tasks):
            if run_id in self._kills and self._kills[run_id].is_set():
                continue
            with contextlib.suppress(ApiError):
                run = await self._s.client.get_run(run_id)
                if run.status == RunStatus.KILLED:
                    self._kill(run_id)

    def _on_ring(self, ring: Ring) -> None:
        """Act on what the ring names once the server confirms it; a ring we cannot act on wakes the poll.

        Anyone who can publish to the broker can ring (docs/security.md, "Node: the doorbell is only a
        hint..."): a ring never kills or starts anything by itself. The run it names is read from the REST
        API first (`_check_ring`), and only what the server says is acted on. A poll per ring would put a list
        and a status read of every live run on the server; the regular poll still catches what a ring missed.
        `poll` (the server's doorbell queue was full and this stands for the messages it could not keep),
        `reconnected` and events this agent does not know wake the poll at once.
        """
        self.metrics.doorbells.inc()
        if ring.event in ("poll", "reconnected"):
            self._wake.set()  # the server's queue was full, or we may have missed messages: poll now
        elif ring.event in ("run-killed", "run-created") and ring.run_id is not None:
            if ring.event == "run-killed" and ring.run_id not in self._tasks:
                return  # nothing of ours to stop: nothing to ask the server about
            if ring.event == "run-created" and ring.run_id in self._tasks:
                return
            key = (ring.event, ring.run_id)
            if key in self._ring_checks:
                return  # one question per run and event at a time, however often it is rung
            checking = asyncio.create_task(self._check_ring(ring, time.time()), name=f"ring-{ring.run_id}")
            self._ring_checks[key] = checking
            checking.add_done_callback(lambda _: self._ring_checks.pop(key, None))
        elif ring.event == "ledger":
            if self._s.leases is not None:
                self._s.leases.poke()  # a hint too: the ledger is read and verified, not taken from the ring
        else:
            self._wake.set()  # an event of a newer server: the poll finds whatever it was about

    async def _check_ring(self, ring: Ring, rung_at: float) -> None:
        """Read the rung run from the server; kill or start only what the server's answer says. A new run
        rung with a spread is asked about after a random delay within it (the poll is never delayed)."""
        assert ring.run_id is not None
        run_id, s = ring.run_id, self._s
        delay_s = claim_delay_s(ring)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
            if run_id in self._tasks:
                return  # the poll claimed it meanwhile
        try:
            run = await s.client.get_run(run_id)
        except ApiError as exc:
            log.warning(
                "doorbell: %s for run %s is only a hint and the server does not show that run (%s): ignored",
                ring.event,
                run_id,
                exc.detail or exc.error,
            )
            return
        except ServerUnavailable:
            self._wake.set()  # the poll asks again once the server answers
            return
        except Exception:  # a ring never stops the agent
            log.exception("doorbell: checking %s for run %s failed", ring.event, run_id)
            return
        if ring.event == "run-killed":
            if run.status == RunStatus.KILLED:
                self._kill(run_id)
            else:
                log.warning(
                    "doorbell: run-killed for run %s is only a hint; the server says it is %s: not killed",
                    run_id,
                    run.status,
                )
            return
        if run.organization_id != s.organization_id or run.status != RunStatus.PENDING:
            log.warning(
                "doorbell: run-created for run %s is only a hint; the server says it is %s for organization "
                "%s: nothing started",
                run_id,
                run.status,
                run.organization_id,
            )
            return
        if run_id not in self._tasks and not self._stopping.is_set():
            # Claim at once (atomic on the server; the poll is the safety net), with the job the server named.
            self._spawn(run_id, rung_at=rung_at, job_hint=run.job_id)

    def _kill(self, run_id: int, reason: str | None = None) -> None:
        event = self._kills.get(run_id)
        if event is not None and not event.is_set():
            if reason is not None:
                self._s.kill_reasons[run_id] = reason
            log.info("run %s: kill requested%s", run_id, f" ({reason})" if reason else "")
            event.set()

    def _broker_up(self) -> bool:
        return self.doorbell is not None and self.doorbell.connected.is_set()

    def _runner_or_fail(self) -> Runner:
        assert self.runner is not None
        return self.runner

    def _spawn(self, run_id: int, rung_at: float | None = None, job_hint: int | None = None) -> None:
        async def body(kill: asyncio.Event) -> None:
            async with self._semaphore:
                if not kill.is_set():
                    await self._runner_or_fail().execute(run_id, kill, rung_at, job_hint)

        self._track(run_id, body)

    def _spawn_resumed(self, run_id: int, resume: Resume) -> None:
        """Follow a run recovered after a restart."""

        async def body(kill: asyncio.Event) -> None:
            async with self._semaphore:
                await resume(kill)

        self._track(run_id, body)

    def _track(self, run_id: int, body: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        assert self._tg is not None
        kill = asyncio.Event()
        self._kills[run_id] = kill

        async def guarded() -> None:
            try:
                await body(kill)
            except asyncio.CancelledError:
                raise
            except ServerUnavailable as exc:  # the journal keeps the run; the next good poll retries it
                log.warning("run %s: server unreachable (%s); will retry from the journal", run_id, exc)
            except Exception as exc:
                log.exception("run %s: unexpected error", run_id)
                await self._runner_or_fail().abandon(run_id, exc)
            finally:
                self._tasks.pop(run_id, None)
                self._kills.pop(run_id, None)
                self._s.kill_reasons.pop(run_id, None)
                self._wake.set()

        self._tasks[run_id] = self._tg.create_task(guarded(), name=f"run-{run_id}")


def _resume_as(step: Callable[..., Awaitable[None]], *args: object) -> Resume:
    """A resume function (taking the kill event, which a finishing run no longer needs) calling step."""

    async def resume(kill: asyncio.Event) -> None:
        del kill
        await step(*args)

    return resume
