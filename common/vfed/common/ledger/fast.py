"""Bulk signature checks for a full verification: the Ed25519 work, spread over the CPUs, ahead of the
sequential pass that decides which key may sign what (`LedgerState.apply` then skips those checks).

`preverify` computes each entry's signed message and hands the (key, signature, message) triples to worker
processes; it returns at once, having told the state, for each entry, how to learn which signatures held. The
state's sequential pass (`apply`, on the caller's thread) waits only for the chunk it has reached, so the
Ed25519 work overlaps the Python work of applying.

Why processes and not threads: libsodium's verify releases the GIL (cffi), so two threads verify at twice the
single-core rate while nothing else runs (bench/ledger.py); but a thread that finished one check needs the GIL
back for the next, and while the applying thread holds it (it always does: it runs Python) the checking thread
waits out the interpreter's switch interval (5 ms) for every signature. Worker processes have no such
hand-off. They are small (`python -I -c` importing only `nacl.bindings`, about 30 ms to start), started on
the first large check, shared by every state in the process, and stopped after `IDLE_S` without work, at exit
and in a forked child. A worker that fails (dies, hangs past `WAIT_S`) costs nothing but time: its chunk is
checked here instead. Small batches are checked here at once (`MIN_PARALLEL`).

Only keys that some record of the batch names (key records, certificates) or that the state already verified
(its organizations' chains and accepted certificates) are used; a signature that does not verify is simply not
marked, and `apply` checks that entry itself (and reports it). Marks say only "this key signed this entry";
`apply` decides which key may sign what.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import itertools
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Literal, cast

import nacl.bindings

from vfed.common.crypto import PublicKey
from vfed.common.ledger.chain import Record, entry_json
from vfed.common.ledger.state import LedgerState
from vfed.common.trust.certificates import KIND_CERTIFICATE
from vfed.common.trust.errors import MalformedEntry, TrustError
from vfed.common.trust.keychain import KIND_GENESIS, KIND_ROTATION, record_key

log = logging.getLogger("vfed.ledger")

KEY_BEARING = frozenset({KIND_GENESIS, KIND_ROTATION, KIND_CERTIFICATE})
MODE_ENV = "VFED_LEDGER_VERIFY"
Mode = Literal["inline", "threads", "processes"]
MODES: tuple[Mode, ...] = ("inline", "threads", "processes")
MIN_PARALLEL = 256
"""Fewer signatures than this are checked on the caller's thread (a worker round trip costs more)."""
CHUNK = 32
"""Signatures per job: small, so the sequential pass can start soon after `preverify` returns."""
IDLE_S = 30.0
PIPE_BYTES = 1 << 20
WAIT_S = 60.0
_HEAD = struct.Struct(">II")  # job id, payload bytes (to a worker) or result count (from it)
_LEN = struct.Struct(">I")

# One item: Ed25519 public key (32), signature (64), message length (4), message. The answer: one byte per
# item, 1 when it verified. Runs as `python -I -c`: imports nothing of vfed, ignores ^C (the parent decides).
_WORKER_CODE = """
import signal, struct, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
from nacl.bindings import crypto_sign_open
head, length = struct.Struct(">II"), struct.Struct(">I")
src, dst = sys.stdin.buffer, sys.stdout.buffer
while True:
    raw = src.read(8)
    if len(raw) < 8:
        break
    job, size = head.unpack(raw)
    buf = src.read(size)
    if len(buf) < size:
        break
    out, pos = bytearray(), 0
    while pos < size:
        (n,) = length.unpack_from(buf, pos + 96)
        try:
            crypto_sign_open(buf[pos + 32 : pos + 96] + buf[pos + 100 : pos + 100 + n], buf[pos : pos + 32])
            out.append(1)
        except Exception:
            out.append(0)
        pos += 100 + n
    dst.write(head.pack(job, len(out)) + out)
    dst.flush()
"""


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
Item = tuple[bytes, bytes, bytes]  # Ed25519 public key, signature, message


def _check(items: Sequence[Item]) -> bytes:
    out = bytearray()
    for key, sig, message in items:
        try:
            nacl.bindings.crypto_sign_open(sig + message, key)
            out.append(1)
        except Exception:
            out.append(0)
    return bytes(out)


class _Job:
    """One chunk of signature checks; `keys_for(seq)` waits for it (or checks here if its worker failed)."""

    __slots__ = ("_by_seq", "_lock", "_result", "done", "items", "marks")

    def __init__(self, items: list[Item], marks: list[tuple[int, str]]) -> None:
        self.items = items
        self.marks = marks  # (seq, key id) per item
        self.done = threading.Event()
        self._result: bytes | None = None
        self._by_seq: dict[int, frozenset[str]] | None = None
        self._lock = threading.Lock()

    def payload(self) -> bytes:
        return b"".join(key + sig + _LEN.pack(len(msg)) + msg for key, sig, msg in self.items)

    def finish(self, result: bytes | None) -> None:
        """The worker's answer, or None when it could not give one."""
        self._result = result if result is not None and len(result) == len(self.items) else None
        self.done.set()

    def keys_for(self, seq: int) -> frozenset[str]:
        by_seq = self._by_seq
        if by_seq is None:
            with self._lock:
                if self._by_seq is None:
                    self._by_seq = self._resolve()
                by_seq = self._by_seq
        return by_seq.get(seq, frozenset())

    def _resolve(self) -> dict[int, frozenset[str]]:
        if not self.done.wait(WAIT_S):
            log.warning("a ledger signature worker did not answer in %.0f s; checking here", WAIT_S)
        result = self._result
        if result is None:
            result = _check(self.items)
        good: dict[int, set[str]] = {}
        for (seq, key_id), ok in zip(self.marks, result, strict=True):
            if ok == 1:
                good.setdefault(seq, set()).add(key_id)
        return {seq: frozenset(ids) for seq, ids in good.items()}


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
                    job.finish(result)
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
    """Collects (key, signature, message) items in entry order and hands out jobs of about CHUNK items, an
    entry's signatures always in one job."""

    def __init__(self, state: LedgerState, send: Callable[[_Job], None]) -> None:
        self.state, self.send = state, send
        self.items: list[Item] = []
        self.marks: list[tuple[int, str]] = []

    def add(self, seq: int, items: list[Item], marks: list[tuple[int, str]]) -> None:
        self.items += items
        self.marks += marks
        if len(self.items) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        job = _Job(self.items, self.marks)
        self.items, self.marks = [], []
        for seq in dict.fromkeys(seq for seq, _ in job.marks):
            self.state.preverified(seq, _pending(job, seq))
        self.send(job)


def _walk(state: LedgerState, records: Sequence[Record], batch: _Batch) -> None:
    """Every signature whose key is known, in entry order, into `batch`; and each entry's digest and JSON for
    `apply` (it needs them too, and the canonical body is made once here)."""
    keys = {key_id: key.ed25519 for key_id, key in verified_keys(state).items()}
    keys.update((key_id, key.ed25519) for key_id, key in known_keys(records).items())
    for record in records:
        entry, seq = record.entry, record.seq
        message: bytes | None = None
        items: list[Item] = []
        marks: list[tuple[int, str]] = []
        for sig in entry.sigs:
            key = keys.get(sig.key_id)
            if key is None:
                continue
            try:
                raw = sig.raw()
                if message is None:
                    message = entry.message()
            except (MalformedEntry, TrustError, ValueError):  # apply names what is wrong, in order
                continue
            items.append((key, raw, message))
            marks.append((seq, sig.key_id))
        if items:
            batch.add(seq, items, marks)
        if message is not None:
            try:
                text: bytes | None = entry_json(entry, message)
            except (MalformedEntry, ValueError):  # apply meets it too, and says so in order
                text = None
            state._known(seq, entry, message, text)
    batch.flush()


def preverify(state: LedgerState, records: Sequence[Record], *, mode: Mode | None = None) -> None:
    """Check every signature whose key some record names (or the state verified); tell `state` which hold.

    In `processes` mode (the automatic choice for a large batch) and `threads` mode this returns before the
    checks are done: `apply` waits for the chunk it reaches. `mode`: None for VFED_LEDGER_VERIFY or the
    automatic choice (`default_mode`)."""
    chosen = mode or default_mode(sum(len(record.entry.sigs) for record in records))
    if chosen == "inline":
        _walk(state, records, _Batch(state, lambda job: job.finish(_check(job.items))))
        return
    if chosen == "threads":
        pool = _POOL.executor()

        def run(job: _Job) -> None:
            pool.submit(_check, job.items).add_done_callback(
                lambda f: job.finish(None if f.exception() else f.result())
            )

        _walk(state, records, _Batch(state, run))
        return
    workers = _POOL.get()
    turn = itertools.count()

    def send(job: _Job) -> None:  # in turn: jobs in entry order, the sequential pass meets them in turn too
        workers[next(turn) % len(workers)].submit(job)

    _walk(state, records, _Batch(state, send))


def _pending(job: _Job, seq: int) -> Callable[[], frozenset[str]]:
    return lambda: job.keys_for(seq)
