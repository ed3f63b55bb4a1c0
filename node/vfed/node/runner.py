"""One run from claim to final status: the steps between the agent's loop and the runtime.

Every refusal ends the run with a clear status and reason (never an exception out of the agent), and every
step that matters after a crash is written to the journal before the next one starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from pydantic import SecretStr

from vfed.common.api import Reason, classified
from vfed.common.api.errors import ApiError
from vfed.common.api.reasons import type_name
from vfed.common.api.resources import Run, Task
from vfed.common.crypto import ContextMismatch as BoundElsewhere
from vfed.common.crypto import CryptoError, Keyring
from vfed.common.trust import ChainResolver, ContextMismatch, DescriptorDocument, TrustError, input_context
from vfed.node import ahead, budget, disclosure, run_folder, sql_dataset, timeline
from vfed.node.config import NodeSettings
from vfed.node.early_job import BusyJobs, EarlyJobFolder
from vfed.node.image_sdk import SdkVerdicts
from vfed.node.journal import Journal
from vfed.node.keys import KeyHolder
from vfed.node.leases import LeaseGuard, lease_refusal
from vfed.node.ledger import NodeLedger
from vfed.node.metrics import NodeMetrics
from vfed.node.policy import check_run, image_gate, subtask_image_refusal
from vfed.node.privacy import BudgetRefused, BudgetStore
from vfed.node.run_input import SEALED_INPUT_NAME, RunInput, SealedInput, decrypt_sealed
from vfed.node.run_setup import RunSetup
from vfed.node.runtime.base import (
    LABEL_AGENT,
    DatasetMount,
    ExtractedDataset,
    PermanentStartError,
    RunSpec,
    Runtime,
    RuntimeUnavailable,
    algorithm_env,
    extracted_name,
)
from vfed.node.server_api import AlreadyClaimed, Claim, NodeClient
from vfed.node.timeline import StartTimeline
from vfed.node.trust import Accepted, RunChecks, refusal_reason
from vfed.proxy.app import ProxyContext, RunInfo
from vfed.proxy.context import ProxyLimits
from vfed.proxy.listener import ProxyListener, new_token
from vfed.proxy.rest import RestClient
from vfed.proxy.server import ProxyServer

log = logging.getLogger(__name__)
T = TypeVar("T")

EPSILON_GRANTED_ENV = "VFED_EPSILON_GRANTED"


def _not_started(run_id: int, exc: Exception) -> RunRefused:
    """The engine's words (paths of the node's datasets, its own errors) stay in the node's log."""
    log.warning("run %s: the container did not start: %s", run_id, exc)
    return RunRefused("start-failed", "the container did not start (the node's log says why)")


class RunRefused(Exception):
    """The run cannot go on; it ends with this status and reason."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Prepared:
    """A run that passed every check and has its input on disk."""

    run: Run
    task: Task
    digest: str
    max_run_time_s: float
    run_dir: Path
    accepted: Accepted
    output_rules: disclosure.OutputRules
    epsilon: float | None = None


@dataclass
class Services:
    """What every run shares with the agent."""

    settings: NodeSettings
    client: NodeClient
    session: aiohttp.ClientSession
    key_holder: KeyHolder
    runtime: Runtime
    journal: Journal
    metrics: NodeMetrics
    organization_id: int
    collaboration_id: int
    budget: BudgetStore
    """Epsilon spent per dataset (privacy budgets, `privacy.sqlite3`)."""
    chains: ChainResolver
    """Other organizations' key chains, verified against the node's trust store (shared with the proxies)."""
    checks: RunChecks
    server_identity: str = ""
    """The server's fingerprint (orphans.server_identity): run ids are only unique under it."""
    jobs_in_setup: BusyJobs = field(default_factory=BusyJobs)
    """Jobs whose folder a run set up before its claim (early_job): busy, like the journal's."""
    ledger: NodeLedger | None = None
    """The collaboration's ledger as verified here; None with `leases: off`."""
    leases: LeaseGuard | None = None
    """Lease checks, reservations, the watch that kills and the receipts; None with `leases: off`."""
    kill_reasons: dict[int, str] = field(default_factory=dict)
    """Why a run is asked to end, when not on the server's request (a lease revoked or expired)."""
    sdk_verdicts: SdkVerdicts = field(default_factory=SdkVerdicts)
    """Images refused for the SDK their `vfed.sdk` label declares, by image ID (image_sdk)."""
    listener: ProxyListener | None = None
    """The proxy listener of runs that reach their proxy over a network (runtime.proxy_over_network); None
    for a socket runtime, or when the runtime gives its runs no way out."""

    @property
    def keyring(self) -> Keyring:
        """The organization's keyring as last loaded (a rotated key file is picked up while running)."""
        return self.key_holder.keyring


class Runner:
    """Claims and carries out runs; `finisher` (finish.py) does the part after the container."""

    def __init__(self, services: Services) -> None:
        self.s = services
        from vfed.node.finish import Finisher

        self.finisher = Finisher(services)

    def run_dir(self, run_id: int) -> Path:
        return self.finisher.run_dir(run_id)

    def socket_path(self, run_id: int) -> Path:
        return self.finisher.socket_dir(run_id) / "proxy.sock"

    async def execute(
        self, run_id: int, kill: asyncio.Event, rung_at: float | None = None, job_hint: int | None = None
    ) -> None:
        """Claim the run and carry it through; returns quietly when another node claimed it first.

        `job_hint` (the doorbell's job id) starts the job's folder while the claim is on its way.
        """
        claimed_at = time.monotonic()
        trace = StartTimeline(run_id, rung_at)
        trace.activate()  # this task's context: the setup tasks and runtime threads below mark it too
        early = self._early_job(job_hint)
        trace.mark("claim_sent")
        claim = await self._claim(run_id, early)
        if claim is None:
            return
        trace.mark("claimed")
        journaled = self._journal_claim(claim)
        journaled.add_done_callback(lambda _: trace.mark("journaled"))
        log.info("run %s: claimed (task %s, job %s)", claim.id, claim.task_id, claim.job_id)
        task = claim.task or await self.s.client.get_task(claim.task_id)  # an older server sends no task
        token = claim.run_token.token if claim.run_token is not None else None
        # What does not depend on the checks starts now and is taken down on a refusal: the image lookup and
        # the job's folder (engine calls), then the proxy once the input is decrypted (_prepare).
        volume = await early.take(claim.job_id) if early is not None else None
        if volume is None:
            volume = asyncio.ensure_future(
                self.s.runtime.ensure_job_volume(self.s.settings.name, str(claim.job_id))
            )
            volume.add_done_callback(lambda _: trace.mark("job_folder"))
        setup = RunSetup(journaled, asyncio.ensure_future(self._image_digest(task)), volume, self.s.runtime)
        setup.digest.add_done_callback(lambda _: trace.mark("image"))
        try:
            run_folder.fresh(self.run_dir(claim.id))  # a few syscalls: a thread hop would cost more
            setup.creating = asyncio.ensure_future(self._create_ahead(claim, task, setup))
            prepared = await self._prepare(claim, task, setup, token)
            proxy = await setup.ready()
        except RunRefused as refused:
            await setup.undo()
            await self.finisher.end_without_container(claim.id, refused.status, refused.reason, claim.job_id)
            return
        except BaseException:
            await setup.undo()
            raise
        trace.mark("prepared")
        await self._start_and_follow(prepared, proxy, setup.created, kill, claimed_at, trace)

    def _journal_claim(self, claim: Claim) -> asyncio.Future[None]:
        """The claim's journal entry, written (with its fsync) in a thread while the loop sets the run up;
        the container is created only after it landed. Until then the job counts as busy, so a finishing run
        of the same job does not take the job folder away."""
        self.s.jobs_in_setup.hold(claim.job_id)
        written = asyncio.ensure_future(
            asyncio.to_thread(self.s.journal.claimed, claim.id, claim.task_id, claim.job_id)
        )
        written.add_done_callback(lambda _: self.s.jobs_in_setup.release(claim.job_id))
        return written

    def _early_job(self, job_hint: int | None) -> EarlyJobFolder | None:
        if job_hint is None or job_hint <= 0:
            return None
        early = EarlyJobFolder(self.s, self.finisher, job_hint)
        early.start()
        assert early.volume is not None
        early.volume.add_done_callback(lambda _: timeline.mark("job_folder"))
        return early

    async def _claim(self, run_id: int, early: EarlyJobFolder | None) -> Claim | None:
        """The claim's answer; None when the run is not ours to run (what the hint set up is taken down)."""
        claim = None
        try:
            claim = await self.s.client.claim(run_id)
        except AlreadyClaimed:
            log.info("run %s: claimed by another node", run_id)
        except ApiError as exc:  # e.g. a doorbell for a run this node may not claim
            log.warning("run %s: cannot claim: %s", run_id, exc)
        finally:  # also when the server went away: nothing is journaled, the poll tries again
            if claim is None and early is not None:
                await early.drop()
        return claim

    async def abandon(self, run_id: int, exc: BaseException) -> None:
        """After an unexpected error: remove the container if any and mark the run crashed, best effort."""
        entry = self.s.journal.get(run_id)
        if entry is None:
            return
        if entry.handle is not None:
            with contextlib.suppress(Exception):
                await self.s.runtime.cleanup(entry.handle)
        with contextlib.suppress(Exception):
            log.error("run %s: node agent error: %r", run_id, exc)  # the words stay here: they may quote data
            reason = classified(Reason.NODE_ERROR, type_name(type(exc).__name__))
            await self.finisher.end_without_container(run_id, "crashed", reason, entry.job_id)

    async def _prepare(self, run: Run, task: Task, setup: RunSetup, token: str | None) -> Prepared:
        """Input and checks. The loop verifies and decrypts while the engine looks the image up, then starts
        the run's proxy while it waits for that answer: the loop's own work stays off the critical path."""
        accepted, run_input, remembered = await self._trusted_input(run, task)
        timeline.mark("decrypted")
        document = accepted.verified.document
        setup.proxy = asyncio.ensure_future(self.start_proxy(run, task, token, document))
        setup.proxy.add_done_callback(lambda _: timeline.mark("proxy"))
        try:
            digest = await setup.digest
        finally:
            await self._not_replayed(run, remembered)
        decision = check_run(
            self.s.settings,
            image=task.image,
            digest=digest,
            initiators=[(i.org, i.user) for i in accepted.verified.initiators()],
        )
        if not decision.allowed:
            raise RunRefused("not-allowed", decision.reason)
        incompatible = await self.s.sdk_verdicts.refusal(self.s.runtime, digest)
        if incompatible is not None:  # image_sdk logged which image and why
            raise RunRefused("not-allowed", incompatible)
        missing = [d for d in task.datasets if d not in self.s.settings.datasets]
        if missing:
            raise RunRefused("not-allowed", f"this node offers no dataset labelled {', '.join(missing)}")
        if self.s.leases is not None:
            await self._reserve_leases(run, task, accepted, digest, run_input)
        try:
            epsilon = await budget.charge(
                self.s.settings,
                self.s.budget,
                self.s.runtime,
                # The store outlives servers: a reset server's run 5 is not the run 5 charged before.
                run_key=self.s.checks.run_key(run.id),
                image=digest,  # the manifest of exactly the image the policy checked
                run_input=run_input,
                datasets=task.datasets,
                initiator=str(accepted.verified.body.initiator.org),
            )
        except BudgetRefused as exc:  # the node's words about its own budget, no data
            raise RunRefused("not-allowed", classified(Reason.DISCLOSURE_REFUSED, str(exc))) from None
        run_dir = self.run_dir(run.id)
        await self._extract_datasets(run, task, run_dir)
        if run_input.data is not None:  # a big input was decrypted into the run folder already
            await _off_loop_if_big(run_input.size, run_folder.write_input, run_dir, run_input.data)
        rules = disclosure.rules_for(self.s.settings, task.datasets, decision.unchecked_outputs, epsilon)
        return Prepared(run, task, digest, decision.max_run_time_s, run_dir, accepted, rules, epsilon)

    async def _extract_datasets(self, run: Run, task: Task, run_dir: Path) -> None:
        """Each `sql` dataset the run reads, extracted to Parquet in its folder (after every check: a refused
        run never touches the database). A failure refuses the run with a classified reason; the database's
        own words stay in this log."""
        for label, dataset in sql_dataset.sql_datasets(self.s.settings.datasets, task.datasets):
            target = run_dir / extracted_name(label)
            log.info(
                "run %s: extracting dataset %s from %s", run.id, label, sql_dataset.shown_uri(dataset.uri)
            )
            try:
                done = await sql_dataset.extract_off_loop(label, dataset, target)
            except sql_dataset.DatasetUnavailable as exc:
                log.warning("run %s: dataset %s: %s (%s)", run.id, label, exc.problem, exc.detail)
                reason = classified(Reason.DATASET_UNAVAILABLE, f"dataset {label}: {exc.problem}")
                raise RunRefused("start-failed", reason) from None
            log.info(
                "run %s: dataset %s extracted: %d rows, %d columns, %d bytes in %.1f s",
                run.id,
                label,
                done.rows,
                len(done.columns),
                done.bytes,
                done.seconds,
            )

    async def _reserve_leases(
        self, run: Run, task: Task, accepted: Accepted, digest: str, run_input: RunInput
    ) -> None:
        """The ledger heads the descriptor names are on this node's chain, and a lease covers each dataset the
        run reads (reserved here; a run that does not start gives it back when it ends)."""
        guard = self.s.leases
        assert guard is not None
        try:
            await guard.check_descriptor(accepted.verified)
            await guard.reserve(
                run_key=self.s.checks.run_key(run.id),
                run_id=run.id,
                task=task,
                digest=digest,
                verified=accepted.verified,
                input_hash=accepted.target.input,
                run_input=run_input,
            )
        except TrustError as exc:
            raise RunRefused("not-allowed", lease_refusal(exc, run.id, self.s.metrics)) from None

    async def _trusted_input(self, run: Run, task: Task) -> tuple[Accepted, RunInput, asyncio.Future[None]]:
        """The task's descriptor verified, the run checked against it and the input it names decrypted; any
        failure refuses the run (RunRefused). The replay record (a journal write with its fsync) is made in a
        thread meanwhile: the caller awaits it (`_not_replayed`) before the budget is charged or anything
        starts."""
        checks = self.s.checks
        try:
            sealed, verified = await asyncio.gather(self._download_input(run), checks.verify(task))
            digest = await _off_loop_if_big(sealed.size, sealed.sha256)
            accepted = checks.assign(verified, run, task, digest)
        except TrustError as exc:
            raise RunRefused("not-allowed", refusal_reason(exc, run.id, self.s.metrics)) from None
        remembered = asyncio.ensure_future(asyncio.to_thread(checks.accept, verified, run.id))
        try:
            run_input = await _off_loop_if_big(sealed.size, self._decrypt, sealed, accepted)
        except BaseException as exc:
            await asyncio.gather(remembered, return_exceptions=True)
            if isinstance(exc, TrustError):
                raise RunRefused("not-allowed", refusal_reason(exc, run.id, self.s.metrics)) from None
            raise
        return accepted, run_input, remembered

    async def _not_replayed(self, run: Run, remembered: asyncio.Future[None]) -> None:
        """The replay record's verdict: a descriptor another run executed refuses this one."""
        try:
            await remembered
        except TrustError as exc:
            raise RunRefused("not-allowed", refusal_reason(exc, run.id, self.s.metrics)) from None

    async def _create_ahead(self, run: Run, task: Task, setup: RunSetup) -> ahead.Ahead | None:
        """The run's container, made while the input is decrypted (module `ahead`); None when it may not
        be, or when a step before it failed (the checks then report that)."""
        # Not after the journal entry: a container made but not started needs none (recovery removes one it
        # does not know); the start waits for the entry (RunSetup.ready).
        try:
            digest = await setup.digest
            await setup.volume
        except Exception:
            return None
        if not ahead.may_create_ahead(self.s.settings, self.s.runtime, task, digest):
            return None
        spec = self.spec_for(run, task, digest, None, self.run_dir(run.id))
        _make_folder(self.socket_path(run.id).parent)  # the proxy's socket comes later, into this folder
        return await ahead.create(self.s.runtime, spec)

    async def _download_input(self, run: Run) -> SealedInput:
        """The claim's inline input, else the blob downloaded into the run folder (resuming a broken
        transfer): a big input is never held in memory."""
        if run.input_blob_id is None:
            raise RunRefused("failed", classified(Reason.BAD_INPUT, "the run has no input blob"))
        try:
            sent = run.input_bytes() if isinstance(run, Claim) else None
        except ValueError:  # binascii.Error: not base64
            reason = classified(Reason.BAD_INPUT, "the server sent an input that is not base64")
            raise RunRefused("failed", reason) from None
        if sent is not None:
            sealed = SealedInput(data=sent, size=len(sent))
        else:
            path = self.run_dir(run.id) / SEALED_INPUT_NAME
            sealed = SealedInput(
                path=path, size=await self.s.client.download_blob_to(run.input_blob_id, path)
            )
        self.s.metrics.bytes_down.inc(sealed.size)
        return sealed

    async def _image_digest(self, task: Task) -> str:
        """The image's ID, once its name passed the node's image rules (policy.image_gate): a name no rule
        admits is refused here, before the engine is asked anything about it (no lookup, no pull)."""
        gate = image_gate(self.s.settings, task.image)
        if not gate.lookup:
            log.warning("run of task %s: %s", task.id, gate.reason)
            raise RunRefused("not-allowed", gate.reason)
        try:
            return await self.s.runtime.image_digest(task.image, pull=gate.pull)
        except PermanentStartError as exc:
            log.warning("run of task %s: image %s is not available: %s", task.id, task.image, exc)
            reason = classified(Reason.IMAGE_UNAVAILABLE, f"image {task.image} is not available at this node")
            raise RunRefused("start-failed", reason) from None

    def _decrypt(self, sealed: SealedInput, accepted: Accepted) -> RunInput:
        """The input, signed by the descriptor's signer and bound to the descriptor's nonce: in memory when
        it came with the claim, else decrypted file to file into the run folder (the envelope then goes)."""
        context = input_context(accepted.verified.body.nonce)
        try:
            return decrypt_sealed(sealed, self.s.keyring, accepted.sender(), context)
        except BoundElsewhere as exc:
            raise ContextMismatch(f"the input belongs to another task than the signed one: {exc}") from None
        except CryptoError as exc:
            log.warning("run input does not decrypt: %s", exc)
            reason = classified(Reason.BAD_INPUT, "the input does not decrypt for this node")
            raise RunRefused("failed", reason) from None

    def spec_for(
        self,
        run: Run,
        task: Task,
        digest: str,
        epsilon: float | None,
        run_dir: Path,
        proxy_token: SecretStr | None = None,
    ) -> RunSpec:
        """The run's container; `proxy_token` is its proxy's (runs reached over a network only)."""
        settings = self.s.settings
        datasets = [_dataset(label, settings) for label in task.datasets]
        networked = self.s.runtime.proxy_over_network
        env = algorithm_env(
            run_id=str(run.id),
            job_id=str(run.job_id),
            organization_id=str(run.organization_id),
            datasets=datasets,
            with_proxy=not networked,  # a networked run's runtime gives PROXY_URL and PROXY_TOKEN_FILE
            extra=_extra_env(settings, task.datasets, epsilon),
        )
        return RunSpec(
            run_id=str(run.id),
            job_id=str(run.job_id),
            node_name=settings.name,
            organization_id=str(run.organization_id),
            # The image the policy checked, by its ID: a tag moved meanwhile cannot swap in another image.
            image=digest,
            env=env,
            run_dir=str(run_dir),
            datasets=[d for d in datasets if isinstance(d, DatasetMount)],
            proxy_socket=None if networked else str(self.socket_path(run.id)),
            proxy_token=proxy_token if networked else None,
            labels={LABEL_AGENT: self.s.journal.agent_id},
        )

    async def start_proxy(
        self,
        run: Run,
        task: Task,
        token: str | None = None,
        descriptor: DescriptorDocument | None = None,
        proxy_token: SecretStr | None = None,
    ) -> ProxyServer | None:
        """The run's own proxy, speaking to the server with the run's token (`token`); it signs the run's
        subtasks with the organization's current key, under the run's verified descriptor.

        It listens on the run's own socket, or, for a runtime whose runs reach it over a network, behind the
        agent's listener under a proxy token of the run's own (`proxy_token`, else a new one: the runtime
        gives it to the run's pod alone). None when such a runtime gives its runs no way out."""
        networked = self.s.runtime.proxy_over_network
        if networked and self.s.listener is None:
            return None
        if token is None:
            token = await self.s.client.run_token(run.id)
        info = RunInfo(
            run.id, run.task_id, run.job_id, run.organization_id, task.collaboration_id, task.image
        )
        settings, keyring = self.s.settings, self.s.keyring
        ctx = ProxyContext(
            run=info,
            rest=RestClient(self.s.session, settings.server_url, token),
            org_key=keyring.current,
            keyring=keyring,
            max_request_bytes=settings.proxy_max_request_bytes,
            spool_dir=settings.data_dir / "spool",
            descriptor=descriptor,
            chains=self.s.chains,
            max_subtasks_per_run=settings.max_subtasks_per_run,
            max_subtask_depth=settings.max_subtask_depth,
            image_refusal=functools.partial(subtask_image_refusal, settings),
            limits=ProxyLimits(
                max_concurrent_requests=settings.proxy_max_concurrent_requests,
                max_concurrent_bodies=settings.proxy_max_concurrent_bodies,
                head_timeout_s=settings.proxy_head_timeout_s,
                body_timeout_s=settings.proxy_body_timeout_s,
                max_blob_uploads=settings.proxy_max_blob_uploads_per_run,
                max_blob_bytes=settings.proxy_max_blob_bytes_per_run,
            ),
        )
        if networked:
            proxy = ProxyServer(ctx, listener=self.s.listener, token=proxy_token or new_token())
        else:
            proxy = ProxyServer(ctx, self.socket_path(run.id))
        await proxy.start()
        return proxy

    async def _start_and_follow(
        self,
        prepared: Prepared,
        proxy: ProxyServer | None,
        early: ahead.Ahead | None,
        kill: asyncio.Event,
        claimed_at: float,
        trace: StartTimeline,
    ) -> None:
        run = prepared.run
        try:
            handle = await self._start_container(prepared, early, proxy)
        except RunRefused as refused:
            if proxy is not None:
                await proxy.stop()
            await self.finisher.end_without_container(run.id, refused.status, refused.reason, run.job_id)
            return
        trace.mark("started")
        self.s.metrics.start_latency.observe(time.monotonic() - claimed_at)
        deadline = time.time() + prepared.max_run_time_s
        self.s.journal.started(run.id, handle, deadline, prepared.output_rules.to_json())
        if self.s.leases is not None:
            self.s.leases.started(self.s.checks.run_key(run.id), run.id)
        trace.emit()
        log.info("run %s: container started (%s)", run.id, handle)
        self.finisher.remember(run.id, prepared.accepted.verified)
        # Marked active while the container already runs: a short run must not wait for this round trip.
        active = asyncio.ensure_future(self._mark_active(run.id, prepared.digest))
        try:
            await self.finisher.follow(run.id, run.job_id, handle, deadline, kill, before_report=active)
        finally:
            active.cancel()
            if proxy is not None:
                await proxy.stop()

    async def _mark_active(self, run_id: int, digest: str) -> None:
        try:
            await self.s.client.patch_run(run_id, status="active", image_digest=digest)
        except Exception as exc:  # the server may have killed it meanwhile; follow() finds out
            log.warning("run %s: could not mark active: %s", run_id, exc)

    async def _start_container(
        self, prepared: Prepared, early: ahead.Ahead | None, proxy: ProxyServer | None
    ) -> str:
        p = prepared
        token = proxy.token if proxy is not None else None
        spec = self.spec_for(p.run, p.task, p.digest, p.epsilon, p.run_dir, token)
        if early is not None:
            try:
                handle = await ahead.start(self.s.runtime, early, spec)
            except PermanentStartError as exc:
                await ahead.discard(self.s.runtime, early)
                raise _not_started(prepared.run.id, exc) from None
            if handle is not None:
                return handle
        for attempt in range(5):
            try:
                return await self.s.runtime.start(spec)
            except PermanentStartError as exc:
                raise _not_started(prepared.run.id, exc) from None
            except RuntimeUnavailable as exc:
                log.warning("run %s: runtime unavailable (%s), attempt %d", prepared.run.id, exc, attempt + 1)
                await asyncio.sleep(0.5 * 2**attempt)
        raise RunRefused("start-failed", "the container runtime stayed unavailable")


_INLINE_MAX_BYTES = 64 * 1024


async def _off_loop_if_big(size: int, fn: Callable[..., T], *args: Any) -> T:
    """Small inputs are decrypted and written on the loop: a thread hop costs more than the work."""
    if size <= _INLINE_MAX_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _dataset(label: str, settings: NodeSettings) -> DatasetMount | ExtractedDataset:
    """A file dataset is mounted; a `sql` one arrives as the Parquet file extracted into the run folder."""
    dataset = settings.datasets[label]
    if dataset.type == "sql":
        return ExtractedDataset(label=label)
    return DatasetMount(label=label, host_path=dataset.uri, type=dataset.type)


def _extra_env(settings: NodeSettings, datasets: list[str], epsilon: float | None) -> dict[str, str]:
    env = disclosure.environment(settings, datasets)
    if epsilon is not None:
        env[EPSILON_GRANTED_ENV] = repr(epsilon)
    return env


def _make_folder(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
