"""The end of a run: wait or kill, read the output, seal it for the initiator, upload, report, clean up.

The output is sealed to the reply keys of the run's verified descriptor (never to a key the server names) and
bound to the descriptor, this organization and the run. Only a completed run's output leaves the node: a
failed run's output is the SDK's error document (exception message, traceback), which stays here.

What the server and the initiator learn of a failure is a classified reason (vfed.common.api.reasons: the
code, and the exception's type name at most), never the algorithm's words. Those are in the log tail, which
is sealed to this organization (and to the initiator only with `share_logs_with_initiator`).

Each step reads the journal and writes it before the next, so `complete` can be called again after a crash
and picks up where the last attempt stopped: the output is sealed once, uploaded once, reported once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from vfed.common.api import Reason, algorithm_error, classified
from vfed.common.api.errors import ApiError
from vfed.common.api.reasons import EXIT_DISCLOSURE, EXIT_SETUP_ERROR, type_name
from vfed.common.crypto import OrgKey, PublicKey, encrypt_fileobj
from vfed.common.disclosure import Rule
from vfed.common.resumable_upload import FileSource, GrowingSource, Session, SourceFailed
from vfed.common.trust import TrustError, VerifiedDescriptor, result_context
from vfed.node import disclosure, run_folder
from vfed.node.journal import Entry, Stage
from vfed.node.log_sealing import seal_run_log
from vfed.node.run_folder import SEALED_NAME, BadOutput
from vfed.node.runtime.base import OUTPUT_NAME, ExitStatus, NotFound, RuntimeUnavailable
from vfed.proxy.rest import ServerUnavailable

if TYPE_CHECKING:
    from vfed.node.runner import Services

log = logging.getLogger(__name__)

T = TypeVar("T")
INLINE_SEAL_BYTES = 64 * 1024
UPLOAD_WHILE_SEALING_BYTES = 8 * 1024 * 1024  # from this size the upload follows the sealing (below: after)


async def retry_server(call: Callable[[], Awaitable[T]], within_s: float) -> T:
    """Call again while the server is unreachable (a restart), for up to within_s; then ServerUnavailable.

    After that the run stays in the journal and the agent's next good poll takes it up again.
    """
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(ServerUnavailable),
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
        stop=stop_after_delay(within_s),
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover


class Finisher:
    """The steps after the container started, shared by live runs and runs recovered after a restart."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self._verified: dict[int, VerifiedDescriptor] = {}  # live runs', so sealing needs no second fetch

    def remember(self, run_id: int, verified: VerifiedDescriptor) -> None:
        self._verified[run_id] = verified

    async def verified(self, run_id: int, task_id: int) -> VerifiedDescriptor:
        """The run's verified descriptor; after a restart the task is read again and its descriptor checked
        as when the run was accepted (TrustError when it no longer is that one)."""
        found = self._verified.get(run_id)
        if found is None:
            task = await self._retry(lambda: self.s.client.get_task(task_id))
            found = await self.s.checks.reverify(run_id, task)
            self._verified[run_id] = found
        return found

    def run_dir(self, run_id: int) -> Path:
        return self.s.settings.data_dir / "runs" / str(run_id)

    def socket_dir(self, run_id: int) -> Path:
        """The run's proxy socket's folder, mounted into its container."""
        return self.s.settings.data_dir / "sockets" / str(run_id)

    async def remove_run_folders(self, run_id: int) -> None:
        """The run's folder and its proxy socket's folder, once the run is over (the socket folder stays while
        the run may still go on: a restarted agent binds the socket again in the folder the container has)."""
        for folder in (self.run_dir(run_id), self.socket_dir(run_id)):
            await asyncio.to_thread(shutil.rmtree, folder, True)

    async def _retry(self, call: Callable[[], Awaitable[T]]) -> T:
        return await retry_server(call, self.s.settings.server_retry_s)

    async def end_without_container(
        self, run_id: int, status: str, reason: str, job_id: int | None = None
    ) -> None:
        """A run refused or failed before its container ran (with job_id: its job folder may be set up)."""
        log.info("run %s: %s: %s", run_id, status, reason)
        await self._report(run_id, status=status, reason=reason)
        self._leases_done(run_id, status)
        self.s.journal.done(run_id)
        self.s.journal.drop_meta(_session_key(run_id))
        self.s.metrics.runs.labels(status).inc()
        await self.remove_run_folders(run_id)
        if job_id is not None:
            await self.release_job_volume(job_id)

    async def follow(
        self,
        run_id: int,
        job_id: int,
        handle: str,
        deadline: float,
        kill: asyncio.Event,
        before_report: Awaitable[None] | None = None,
    ) -> None:
        """Wait for the container, the deadline or a kill, whichever is first; then complete the run.

        `before_report` (the `active` PATCH, sent while the container runs) ends before any later report.
        """
        self.s.metrics.active.inc()
        try:
            status, reason, exit_status = await self._wait_or_kill(run_id, handle, deadline, kill)
        finally:
            self.s.metrics.active.dec()
        if before_report is not None:
            await before_report
        await self.exited(run_id, exit_status, status, reason)
        await self.complete(run_id, job_id, handle)

    async def _wait_or_kill(
        self, run_id: int, handle: str, deadline: float, kill: asyncio.Event
    ) -> tuple[str | None, str | None, ExitStatus | None]:
        runtime = self.s.runtime
        waiting = asyncio.ensure_future(runtime.wait(handle, timeout_s=max(deadline - time.time(), 0.0)))
        killing = asyncio.ensure_future(kill.wait())
        try:
            await asyncio.wait({waiting, killing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            killing.cancel()
        if not waiting.done():
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiting
            await runtime.kill(handle, grace_s=self.s.settings.kill_grace_s)
            # a lease's kill carries its own code (`lease-revoked: ...`): the node's words about its rules
            reason = self.s.kill_reasons.pop(run_id, None) or classified(Reason.KILLED, "on request")
            log.info("run %s: killed: %s", run_id, reason)
            return "killed", reason, await self._final_wait(handle)
        try:
            exit_status = waiting.result()
        except NotFound:
            return "crashed", classified(Reason.LOST, "the container disappeared while running"), None
        if exit_status.timed_out:
            await runtime.kill(handle, grace_s=self.s.settings.kill_grace_s)
            log.info("run %s: past its wall-clock limit, killed", run_id)
            reason = classified(Reason.TIMEOUT, "killed: ran past its wall-clock limit (max_run_time_s)")
            return "failed", reason, await self._final_wait(handle)
        return None, None, exit_status

    async def _final_wait(self, handle: str) -> ExitStatus | None:
        try:
            return await self.s.runtime.wait(handle, timeout_s=self.s.settings.kill_grace_s + 30)
        except (NotFound, RuntimeUnavailable):
            return None

    async def exited(
        self, run_id: int, exit_status: ExitStatus | None, status: str | None, reason: str | None
    ) -> None:
        """Decide the final status from how the container ended and what it left; journal it.

        With an exit status the container has stopped, so the folder it could write is cleaned of traps
        (symlinks to host files, FIFOs) here, the one place that happens, before anything reads it. The
        output of a run that did not complete is removed here: it is the SDK's error document, whose message
        and traceback may quote data.
        """
        run_dir = self.run_dir(run_id)
        code = exit_status.exit_code if exit_status is not None else None
        if exit_status is not None:
            limit, judge = self.s.settings.max_output_bytes, status is None
            rules = self.output_rules(run_id)
            removed, bad, error_type, refusal = await asyncio.to_thread(
                _settle_output, run_dir, limit, exit_status.exit_code, judge, rules
            )
            if removed:
                log.warning("run %s: removed non-regular files from the run folder: %s", run_id, removed)
            if judge:
                if exit_status.reason:  # the engine's words (State.Error): kept here, for the operator
                    log.debug("run %s: the runtime says: %s", run_id, exit_status.reason)
                status, reason = _judge(exit_status, bad, error_type)
                if refusal is not None and status == "completed":
                    log.warning("run %s: output refused (%s): %s", run_id, refusal.reason, refusal.detail)
                    status, reason = "failed", refusal.reason
        if status != "completed":
            (run_dir / OUTPUT_NAME).unlink(missing_ok=True)
        self.s.journal.exited(run_id, code, status or "crashed", reason)
        log.info("run %s: exited with code %s -> %s %s", run_id, code, status, reason or "")

    def output_rules(self, run_id: int) -> disclosure.OutputRules:
        """The disclosure rules the run was accepted with (journaled at its start); the strictest for a run
        journaled without them."""
        entry = self.s.journal.get(run_id)
        if entry is not None and entry.output_rules:
            try:
                return disclosure.OutputRules.from_json(entry.output_rules)
            except (ValueError, TypeError) as exc:
                log.error(
                    "run %s: its journaled output rules are unreadable (%s): the strictest apply", run_id, exc
                )
        return disclosure.fallback_rules(self.s.settings)

    async def complete(self, run_id: int, job_id: int, handle: str | None) -> None:
        """From the journal's stage to the final report; safe to call again after a crash."""
        entry = self.s.journal.get(run_id)
        if entry is None:
            return
        logs = asyncio.ensure_future(self._logs(handle))  # independent of the result: read meanwhile
        try:
            if entry.stage == Stage.EXITED and (self.run_dir(run_id) / OUTPUT_NAME).is_file():
                entry = await self._seal_or_withhold(entry)
            if entry.stage == Stage.SEALED:
                await self._upload(entry)
                entry = self.s.journal.get(run_id) or entry
        except BaseException:
            logs.cancel()
            raise
        log_text = await logs
        sealed = await self._seal_log(entry, log_text) if log_text else None
        status = entry.final_status or "crashed"
        await self._report(
            run_id,
            status=status,
            exit_code=entry.exit_code,
            reason=entry.reason,
            sealed_log=sealed,
            result_blob_id=entry.result_blob_id,
        )
        self._leases_done(run_id, status)
        self.s.journal.done(run_id)
        self.s.journal.drop_meta(_session_key(run_id))
        self._verified.pop(run_id, None)
        self.s.metrics.runs.labels(status).inc()
        log.info("run %s: %s", run_id, status)
        await self._clean_up(run_id, job_id, handle)

    def _leases_done(self, run_id: int, status: str) -> None:
        """Before the journal lets the run go: its leases' reservation is given back (never started) or its
        receipt is queued (started), so a crash in between does neither twice nor never."""
        if self.s.leases is not None:
            self.s.leases.finished(self.s.checks.run_key(run_id), run_id, status)

    async def _seal_or_withhold(self, entry: Entry) -> Entry:
        """Seal the output; a run whose descriptor no longer verifies fails and its output is not released."""
        try:
            await self._seal(entry)
        except TrustError as exc:
            reason = classified(Reason.RESULT_WITHHELD, f"{exc.reason}: {exc.message}")
            log.error("run %s: %s", entry.run_id, reason)
            (self.run_dir(entry.run_id) / OUTPUT_NAME).unlink(missing_ok=True)
            self.s.journal.exited(entry.run_id, entry.exit_code, "failed", reason)
        return self.s.journal.get(entry.run_id) or entry

    async def _seal(self, entry: Entry) -> None:
        self.s.journal.drop_meta(_session_key(entry.run_id))  # bytes of an earlier sealing are not these
        verified = await self.verified(entry.run_id, entry.task_id)
        context = result_context(verified.digest, self.s.organization_id, entry.run_id)
        recipients = list(verified.reply_keys)
        run_dir = self.run_dir(entry.run_id)
        key, limit = self.s.keyring.current, self.s.settings.max_output_bytes
        # a thread hop costs more than sealing a few KiB
        size = run_folder.output_size(run_dir)
        if size <= INLINE_SEAL_BYTES:
            _seal_file(run_dir, key, recipients, limit, context)
        elif size < UPLOAD_WHILE_SEALING_BYTES:
            await asyncio.to_thread(_seal_file, run_dir, key, recipients, limit, context)
        else:
            await self._seal_uploading(entry, run_dir, key, recipients, limit, context)
            return
        self.s.journal.sealed(entry.run_id)

    async def _seal_uploading(
        self,
        entry: Entry,
        run_dir: Path,
        key: OrgKey,
        recipients: list[PublicKey],
        limit: int,
        context: bytes,
    ) -> None:
        """Seal a big output and upload it at the same time: the upload follows the sealed file as the
        sealing thread writes it (vfed.common.growing_file), so the bytes are read back once from the page
        cache instead of a second pass over the file. A failed seal ends the upload unfinished (the server
        keeps nothing of it) and fails the run as before; a failed upload leaves the journal at `sealed`, and
        `_upload` goes on with the journaled upload session from the sealed file, with its retries."""
        sealed = threading.Event()
        seal = (run_dir, key, recipients, limit, context)
        sealing = asyncio.ensure_future(asyncio.to_thread(_seal_file, *seal))
        sealing.add_done_callback(lambda _: sealed.set())
        paths = [_sealing_tmp(run_dir), run_dir / SEALED_NAME]
        source = GrowingSource(paths, sealed, lambda: sealing.cancelled() or sealing.exception() is not None)
        started = functools.partial(self._keep_session, entry.run_id)
        uploading = asyncio.ensure_future(self.s.client.upload_source(source, started=started))
        try:
            await asyncio.shield(sealing)
        except BaseException:
            uploading.cancel()
            await asyncio.gather(sealing, uploading, return_exceptions=True)
            raise
        self.s.journal.sealed(entry.run_id)
        try:
            info = await uploading
        except (ServerUnavailable, ApiError, OSError, SourceFailed) as exc:
            log.warning("run %s: upload while sealing failed (%s); sending it again", entry.run_id, exc)
            return
        if self.s.leases is not None:  # the receipt names the result blob by its SHA-256 (computed here)
            self.s.leases.store.result(self.s.checks.run_key(entry.run_id), info.sha256)
        self.s.metrics.bytes_up.inc(info.size)
        self.s.journal.uploaded(entry.run_id, info.id)
        self.s.journal.drop_meta(_session_key(entry.run_id))

    async def _upload(self, entry: Entry) -> None:
        path = self.run_dir(entry.run_id) / SEALED_NAME
        size = path.stat().st_size
        if self.s.leases is not None:  # the receipt names the result blob by its SHA-256
            digest = await asyncio.to_thread(_sha256_file, path)
            self.s.leases.store.result(self.s.checks.run_key(entry.run_id), digest)
        started = functools.partial(self._keep_session, entry.run_id)
        info = await self._retry(
            lambda: self.s.client.upload_source(
                FileSource(path), size=size, resume=self._kept_session(entry.run_id), started=started
            )
        )
        self.s.metrics.bytes_up.inc(size)
        self.s.journal.uploaded(entry.run_id, info.id)
        self.s.journal.drop_meta(_session_key(entry.run_id))

    def _keep_session(self, run_id: int, session: Session) -> None:
        """The run's upload session, journaled: an agent restarted mid-upload goes on with it (the sealed
        file it sends is the same; a run sealed again forgets it)."""
        self.s.journal.set_meta(_session_key(run_id), f"{session.id} {session.blob_id}")

    def _kept_session(self, run_id: int) -> Session | None:
        kept = (self.s.journal.meta(_session_key(run_id)) or "").split()
        return Session(kept[0], kept[1]) if len(kept) == 2 else None

    async def _seal_log(self, entry: Entry, text: str) -> str | None:
        """The log tail sealed to this organization, and to the initiator with the opt-in; None when it
        cannot be sealed (then nothing of it leaves the node)."""
        initiator: list[PublicKey] = []
        if self.s.settings.share_logs_with_initiator:
            try:
                initiator = list((await self.verified(entry.run_id, entry.task_id)).reply_keys)
            except (TrustError, ServerUnavailable, ApiError) as exc:
                log.warning("run %s: log sealed to this organization only: %s", entry.run_id, exc)
        try:
            org, limit = self.s.organization_id, self.s.settings.max_log_bytes
            return await seal_run_log(
                text, self.s.keyring, initiator, org, entry.task_id, entry.run_id, limit
            )
        except Exception as exc:  # a log is a courtesy; never let it block the report
            log.warning("run %s: could not seal the log: %s", entry.run_id, exc)
            return None

    async def _logs(self, handle: str | None) -> str | None:
        if handle is None:
            return None
        try:
            return await self.s.runtime.logs(handle, max_bytes=self.s.settings.max_log_bytes)
        except Exception as exc:  # logs are a courtesy; never let them block the result
            log.warning("could not read logs of %s: %s", handle, exc)
            return None

    async def _report(self, run_id: int, **fields: object) -> None:
        """PATCH the final state; a run the server already ended (409) still gets its sealed log, and a
        server that refuses the sealed log's size (413) still gets the state."""
        try:
            await self._retry(lambda: self.s.client.patch_run(run_id, **fields))
        except ApiError as exc:
            if exc.status == 413 and fields.get("sealed_log"):
                log.warning("run %s: the server refused the sealed log (%s), reported without", run_id, exc)
                await self._report(run_id, **{**fields, "sealed_log": None})
                return
            if exc.status != 409:
                log.error("run %s: the server refused the final status: %s", run_id, exc)
                return
            if fields.get("sealed_log"):
                with contextlib.suppress(ApiError, ServerUnavailable):
                    await self.s.client.patch_run(run_id, sealed_log=fields["sealed_log"])

    async def _clean_up(self, run_id: int, job_id: int, handle: str | None) -> None:
        if handle is not None:
            with contextlib.suppress(NotFound, RuntimeUnavailable):
                await self.s.runtime.cleanup(handle)
        await self.remove_run_folders(run_id)
        await self.release_job_volume(job_id)

    async def release_job_volume(self, job_id: int) -> None:
        """Remove the job's folder once its last run here ended, unless retained (the janitor's, then)."""
        retained = self.s.settings.job_volume_retention_s > 0
        if retained or job_id in self.s.jobs_in_setup:  # a run claiming into this job needs it
            return
        if not any(e.job_id == job_id for e in self.s.journal.unfinished()):
            with contextlib.suppress(RuntimeUnavailable, NotFound):
                await self.s.runtime.remove_job_volume(self.s.settings.name, str(job_id))


def _judge(exit_status: ExitStatus, bad_output: str | None, error_type: str | None) -> tuple[str, str | None]:
    """(status, classified reason) of a container that stopped by itself; the exit code is reported
    beside it, and the runtime's own words (exit_status.reason) stay on the node."""
    if exit_status.oom_killed:
        limit = _memory_limit(exit_status.reason)
        return "failed", classified(Reason.OUT_OF_MEMORY, limit)
    code = exit_status.exit_code
    if code == EXIT_DISCLOSURE:
        rule = error_type[len("rule:") :] if error_type and error_type.startswith("rule:") else None
        return "failed", classified(Reason.DISCLOSURE_REFUSED, rule)
    if code == EXIT_SETUP_ERROR:
        return "failed", classified(Reason.BAD_INPUT)
    if code != 0:
        return "failed", algorithm_error(error_type)
    if bad_output is not None:
        return "failed", classified(Reason.BAD_OUTPUT, bad_output)
    return "completed", None


def _memory_limit(runtime_reason: str | None) -> str | None:
    """`limit N MiB` out of the runtime's OOM reason (docker.exit_reason), the node's own number."""
    if runtime_reason and "(limit " in runtime_reason:
        return runtime_reason[runtime_reason.index("(limit ") + 1 :].rstrip(")")
    return None


RULES = frozenset(rule.value for rule in Rule)
ERROR_OUTPUT_MAX_BYTES = 1024 * 1024
"""An SDK error document is small; a bigger output of a failed run is not read for its type."""


def _settle_output(
    run_dir: Path, max_bytes: int, exit_code: int | None, judge: bool, rules: disclosure.OutputRules
) -> tuple[list[str], str | None, str | None, disclosure.Refusal | None]:
    """Clean the stopped run's folder of traps, then (with `judge`: the run ended by itself) check its
    output: (what was removed, why it is bad, the exception type the SDK's error document names when the
    run failed, why disclosure control refuses it)."""
    removed = run_folder.sanitize(run_dir)
    if not judge:
        return removed, None, None, None
    if exit_code not in (0, None):
        try:
            return removed, None, _error_type(run_folder.read_output(run_dir, ERROR_OUTPUT_MAX_BYTES)), None
        except BadOutput:
            return removed, None, None, None
    try:
        with run_folder.open_output(run_dir, max_bytes):
            pass  # a regular file within the limit: sealed later, read once
        return removed, None, None, disclosure.judge(run_dir, rules, max_bytes)
    except BadOutput as exc:
        return removed, str(exc), None, None


def _error_type(data: bytes) -> str | None:
    """The `error.type` of the SDK's error document (vfed.common.payload.encode_error), if it is one; for
    a disclosure refusal, `rule:<name>` when the document names one of the rules (a name out of a fixed
    list, so nothing the algorithm wrote passes on)."""
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("format") != "error":
        return None
    error = document.get("error")
    if not isinstance(error, dict):
        return None
    if error.get("rule") in RULES:
        return f"rule:{error['rule']}"
    return type_name(error.get("type"))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _session_key(run_id: int) -> str:
    return f"upload_session:{run_id}"


def _sealing_tmp(run_dir: Path) -> Path:
    """Where `_seal_file` writes before it renames (this process's name for it)."""
    return run_dir / f".{SEALED_NAME}.{os.getpid()}.tmp"


def _seal_file(
    run_dir: Path, sender: OrgKey, recipients: list[PublicKey], max_bytes: int, context: bytes
) -> None:
    """Stream-encrypt the output into output.sealed, through run_folder.open_output (never a link followed,
    never past max_bytes): the folder was cleaned after the container stopped, and the checks hold even if
    it was not."""
    with run_folder.open_output(run_dir, max_bytes) as source:
        target = run_dir / SEALED_NAME
        tmp = _sealing_tmp(run_dir)
        out_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(out_fd, "wb") as sink:
            encrypt_fileobj(source, sink, sender, recipients, context=context)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, target)
