"""Bulk signature checks for a full verification: the Ed25519 work, spread over the CPUs, ahead of the
sequential pass that decides which key may sign what (`LedgerState.apply` then skips those checks).

`preverify` hands each entry's decoded content (kind, body, signatures) with the keys to check to worker
processes (fastwork.py); they canonicalize it themselves (the signed message, its digest, the SHA-256 of the
canonical entry JSON that the chain links) and check the signatures, so this process never canonicalizes an
entry of a bulk verification. It returns at once, having told the state, for each entry, how to learn what
the workers found. The state's sequential pass (`apply`, on the caller's thread) waits only for the chunk it
has reached, so the workers' work overlaps the Python work of applying.

Why processes and not threads: libsodium's verify releases the GIL (cffi), so two threads verify at twice the
single-core rate while nothing else runs (bench/ledger.py); but a thread that finished one check needs the GIL
back for the next, and while the applying thread holds it (it always does: it runs Python) the checking thread
waits out the interpreter's switch interval (5 ms) for every signature. Worker processes have no such
hand-off. They are small (`python -I -c` importing only `nacl.bindings`, about 30 ms to start), run at a
lower priority than this process (`fastwork.NICE`: its sequential pass is the critical path), started on
the first large check, shared by every state in the process, and stopped after `IDLE_S` without work, at exit
and in a forked child. A worker that fails (dies, hangs past `WAIT_S`) costs nothing but time: its chunk is
done here instead. Small batches are done here at once (`MIN_PARALLEL`).

Only keys that some record of the batch names (key records, certificates) or that the state already verified
(its organizations' chains and accepted certificates) are used; a signature that does not verify is simply not
marked, and `apply` checks that entry itself (and reports it). Marks say only "this key signed this entry",
and hold only for the very entry they were made for; `apply` decides which key may sign what.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import io
import itertools
import logging
import marshal
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Literal, cast

from vfed.common.crypto import PublicKey
from vfed.common.ledger import fastwork
from vfed.common.ledger.chain import Record
from vfed.common.ledger.state import LedgerState
from vfed.common.trust.certificates import KIND_CERTIFICATE
from vfed.common.trust.entries import SignedEntry
from vfed.common.trust.errors import TrustError
from vfed.common.trust.keychain import KIND_GENESIS, KIND_ROTATION, record_key

log = logging.getLogger("vfed.ledger")

KEY_BEARING = frozenset({KIND_GENESIS, KIND_ROTATION, KIND_CERTIFICATE})
MODE_ENV = "VFED_LEDGER_VERIFY"
Mode = Literal["inline", "threads", "processes"]
MODES: tuple[Mode, ...] = ("inline", "threads", "processes")
MIN_PARALLEL = 256
"""Fewer signatures than this are checked on the caller's thread (a worker round trip costs more)."""
CHUNK = 32
"""Entries per job: few, so the sequential pass can start soon after `preverify` returns."""
IDLE_S = 30.0
PIPE_BYTES = 1 << 20
WAIT_S = 60.0
_HEAD = struct.Struct(">II")  # job id, then the bytes of the marshalled job (to a worker) or answer (from it)

_WORKER_CODE = inspect.getsource(fastwork)
"""What a worker runs (`python -I -c`): fastwork.py, which imports nothing of vfed."""


def cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_mode(signatures: int) -> Mode:
    """VFED_LEDGER_VERIFY if set; else processes for a large batch on a machine with several CPUs."""
    raw = os.environ.get(MODE_ENV, "").strip()
    if raw:
        for mode in MODES:
            if raw == mode:
                return mode
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {raw!r}")
    if signatures < MIN_PARALLEL or cpus() < 2:
        return "inline"
    return "processes"


# -- jobs ----------------------------------------------------------------------------------------------------
Made = tuple[str, bytes | None]
"""An entry's digest and the SHA-256 of its canonical JSON (None: the state makes the JSON itself)."""


class _Job:
    """Entries for one worker: each with the checks of its signatures whose keys are known. `resolve(i)` waits
    for the answer (or does the work here if the worker failed) and gives entry i's verified key ids and, when
    made, its digest and entry hash."""

    __slots__ = ("_lock", "_resolved", "_result", "done", "items", "key_ids")

    def __init__(self, items: list[fastwork.Item | None], key_ids: list[tuple[str, ...]]) -> None:
        self.items = items
        self.key_ids = key_ids  # per entry, the key id of each check
        self.done = threading.Event()
        self._result: list[fastwork.Result] | None = None
        self._resolved: list[tuple[frozenset[str], Made | None]] | None = None
        self._lock = threading.Lock()

    def payload(self) -> bytes:
        try:
            return marshal.dumps(self.items)
        except ValueError:  # something in an entry marshal cannot carry exactly: the state does that one
            self.items = [item if _marshals(item) else None for item in self.items]
            return marshal.dumps(self.items)

    def finish(self, result: list[fastwork.Result] | None) -> None:
        """The answer, or None when none came."""
        self._result = result if result is not None and len(result) == len(self.items) else None
        self.done.set()

    def finish_raw(self, raw: bytes) -> None:
        """A worker's answer as it sent it."""
        try:
            result = marshal.loads(raw) if raw else None
        except (EOFError, ValueError, TypeError):
            result = None
        self.finish(result if isinstance(result, list) else None)

    def resolve(self, index: int) -> tuple[frozenset[str], Made | None]:
        resolved = self._resolved
        if resolved is None:
            with self._lock:
                if self._resolved is None:
                    self._resolved = self._resolve()
                resolved = self._resolved
        return resolved[index]

    def _resolve(self) -> list[tuple[frozenset[str], Made | None]]:
        if not self.done.wait(WAIT_S):
            log.warning("a ledger signature worker did not answer in %.0f s; checking here", WAIT_S)
        result = self._result
        if result is None:
            result = fastwork.work(self.items)
        out: list[tuple[frozenset[str], Made | None]] = []
        for key_ids, answer in zip(self.key_ids, result, strict=True):
            if answer is None:
                out.append((frozenset(), None))
                continue
            digest, entry_hash, oks = answer
            good = frozenset(key_id for key_id, ok in zip(key_ids, oks, strict=True) if ok == 1)
            out.append((good, (digest, entry_hash)))
        return out


def _marshals(item: fastwork.Item | None) -> bool:
    try:
        marshal.dumps(item)
    except ValueError:
        return False
    return True


# -- worker processes ----------------------------------------------------------------------------------------
class _Worker:
    """One `python -I -c _WORKER_CODE` process. Jobs are written to it by the caller (its input pipe is made
    deep enough for a page, so this rarely blocks, and a blocked write waits without the GIL); a reader thread
    takes the answers as they come, so the worker never waits for the caller."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin: IO[bytes] = self.proc.stdin
        self._stdout = io.BufferedReader(cast(io.RawIOBase, self.proc.stdout))
        with contextlib.suppress(OSError, AttributeError, ImportError):  # a deeper pipe: a page fits
            import fcntl

            fcntl.fcntl(self._stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}
        self._ids = 0
        self.alive = True
        self._reader = threading.Thread(target=self._read, name="vfed-ledger-verify", daemon=True)
        self._reader.start()

    def submit(self, job: _Job) -> None:
        with self._lock:
            if not self.alive:
                job.finish(None)
                return
            self._ids += 1
            job_id = self._ids
            self._jobs[job_id] = job
        payload = job.payload()
        frame = memoryview(_HEAD.pack(job_id, len(payload)) + payload)
        try:
            with self._write_lock:
                while frame:
                    written = self._stdin.write(frame)
                    frame = frame[written or 0 :]
        except (OSError, ValueError):
            self._fail()

    def _read(self) -> None:
        try:
            while len(raw := self._stdout.read(8)) == 8:
                job_id, count = _HEAD.unpack(raw)
                result = self._stdout.read(count)
                with self._lock:
                    job = self._jobs.pop(job_id, None)
                if job is not None:
                    job.finish_raw(result)
        except (OSError, ValueError):
            pass
        self._fail()

    def _fail(self) -> None:
        with self._lock:
            self.alive = False
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.finish(None)

    def stop(self) -> None:
        """Close its input (it exits when it has answered everything sent) and reap it."""
        with self._write_lock, contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        self._fail()


class _Pool:
    """The process-wide workers, started on the first large batch and stopped after IDLE_S without one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.workers: list[_Worker] = []
        self.timer: threading.Timer | None = None
        self.threads: ThreadPoolExecutor | None = None

    def get(self) -> list[_Worker]:
        with self.lock:
            self.workers = [w for w in self.workers if w.alive]
            while len(self.workers) < cpus():
                self.workers.append(_Worker())
            if self.timer is not None:
                self.timer.cancel()
            self.timer = threading.Timer(IDLE_S, self.stop)
            self.timer.daemon = True
            self.timer.start()
            return list(self.workers)

    def executor(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.threads is None:
                self.threads = ThreadPoolExecutor(max_workers=cpus(), thread_name_prefix="vfed-ledger-verify")
            return self.threads

    def stop(self) -> None:
        with self.lock:
            workers, self.workers = self.workers, []
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        for worker in workers:
            worker.stop()

    def forget(self) -> None:
        """A forked child has none of the parent's threads; its own workers start when it needs them."""
        self.lock, self.workers, self.timer, self.threads = threading.Lock(), [], None, None


_POOL = _Pool()
atexit.register(_POOL.stop)
os.register_at_fork(after_in_child=_POOL.forget)


def shutdown() -> None:
    """Stop the worker processes now (they start again when needed)."""
    _POOL.stop()


# -- the checks ----------------------------------------------------------------------------------------------
def known_keys(records: Sequence[Record]) -> dict[str, PublicKey]:
    keys: dict[str, PublicKey] = {}
    for record in records:
        if record.entry.kind in KEY_BEARING:
            try:
                key = record_key(record.entry)
            except TrustError:
                continue
            keys[key.key_id] = key
    return keys


def verified_keys(state: LedgerState) -> dict[str, PublicKey]:
    """Keys of the chains and certificates the state verified."""
    keys: dict[str, PublicKey] = {}
    for org in list(state._chains):
        chain = state.chain(org)
        if chain is not None:
            keys.update({k.key.key_id: k.key for k in chain.keys})
        for cert in state.certificates(org):
            try:
                key = record_key(cert)
            except TrustError:
                continue
            keys[key.key_id] = key
    return keys


class _Batch:
    """Collects entries in order and hands out jobs of CHUNK entries."""

    def __init__(self, state: LedgerState, send: Callable[[_Job], None]) -> None:
        self.state, self.send = state, send
        self.items: list[fastwork.Item | None] = []
        self.key_ids: list[tuple[str, ...]] = []
        self.entries: list[tuple[int, SignedEntry]] = []

    def add(self, seq: int, entry: SignedEntry, item: fastwork.Item | None, key_ids: tuple[str, ...]) -> None:
        self.items.append(item)
        self.key_ids.append(key_ids)
        self.entries.append((seq, entry))
        if len(self.items) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        job = _Job(self.items, self.key_ids)
        entries = self.entries
        self.items, self.key_ids, self.entries = [], [], []
        known, resolve = self.state._known, job.resolve
        for index, (seq, entry) in enumerate(entries):
            known(seq, entry, resolve, index)
        self.send(job)


def _walk(state: LedgerState, records: Sequence[Record], before: Sequence[Record], batch: _Batch) -> None:
    """Every entry, in order, into `batch`, with a check for each signature whose key is known: the workers
    make its signed message from its body, check the signatures, and make its digest and the hash of its
    canonical JSON for `apply`."""
    keys = {key_id: key.ed25519 for key_id, key in verified_keys(state).items()}
    keys.update((key_id, key.ed25519) for key_id, key in known_keys(before).items())
    keys.update((key_id, key.ed25519) for key_id, key in known_keys(records).items())
    add = batch.add
    for record in records:
        entry = record.entry
        checks: tuple[fastwork.Check, ...]
        key_ids: tuple[str, ...]
        if len(entry.sigs) == 1:  # nearly every entry: the same as below, with less made
            sig = entry.sigs[0]
            sigs: tuple[tuple[str, str], ...] = ((sig.key_id, sig.sig),)
            key = keys.get(sig.key_id)
            checks, key_ids = (((0, key),), (sig.key_id,)) if key is not None else ((), ())
        else:
            sigs = tuple([(sig.key_id, sig.sig) for sig in entry.sigs])
            found = [(i, key_id, keys[key_id]) for i, (key_id, _) in enumerate(sigs) if key_id in keys]
            checks = tuple([(index, key) for index, _, key in found])
            key_ids = tuple([key_id for _, key_id, _ in found])
        add(record.seq, entry, (entry.body, entry.kind, entry.v, sigs, checks), key_ids)
    batch.flush()


def preverify(
    state: LedgerState,
    records: Sequence[Record],
    *,
    mode: Mode | None = None,
    before: Sequence[Record] = (),
) -> None:
    """Check every signature whose key some record names (or the state verified); tell `state` which hold,
    and each entry's digest and entry hash.

    In `processes` mode (the automatic choice for a large batch) and `threads` mode this returns before the
    checks are done: `apply` waits for the chunk it reaches. `mode`: None for VFED_LEDGER_VERIFY or the
    automatic choice (`default_mode`). `before`: records preverified earlier and not applied yet (the keys
    they name are used too), so the next page's checks can run while the last one is applied."""
    chosen = mode or default_mode(sum(len(record.entry.sigs) for record in records))
    if chosen == "inline":
        _walk(state, records, before, _Batch(state, lambda job: job.finish(fastwork.work(job.items))))
        return
    if chosen == "threads":
        pool = _POOL.executor()

        def run(job: _Job) -> None:
            pool.submit(fastwork.work, job.items).add_done_callback(
                lambda f: job.finish(None if f.exception() else f.result())
            )

        _walk(state, records, before, _Batch(state, run))
        return
    workers = _POOL.get()
    turn = itertools.count()

    def send(job: _Job) -> None:  # in turn: jobs in entry order, the sequential pass meets them in turn too
        workers[next(turn) % len(workers)].submit(job)

    _walk(state, records, before, _Batch(state, send))
