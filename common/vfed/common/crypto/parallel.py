"""Chunk work spread over a small process-wide thread pool.

libsodium's AEAD calls release the GIL (cffi), so chunks seal and open on several cores at once. On a
new output buffer most of the time goes to the kernel faulting its pages in, and that too runs in
whichever thread first writes a page; one thread per core roughly halves a 100 MiB call on two cores.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import CryptoError

THREADS_ENV = "VFED_CRYPTO_THREADS"
MAX_THREADS = 16
DEFAULT_MAX_THREADS = 4
# Below this chunk size the per-chunk Python work (and GIL hand-offs) outweighs the cipher.
MIN_PARALLEL_CHUNK = 64 << 10


class _Pool:
    """The process-wide pool, created on first use (importing vfed starts no threads)."""

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None
        self.lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.executor is None:
                self.executor = ThreadPoolExecutor(
                    max_workers=MAX_THREADS - 1, thread_name_prefix="vfed-crypto"
                )
            return self.executor

    def forget(self) -> None:
        """A forked child has none of the parent's pool threads; it makes its own on first use."""
        self.executor, self.lock = None, threading.Lock()


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.forget)


def default_threads() -> int:
    """VFED_CRYPTO_THREADS if set, else min(4, CPUs)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return min(DEFAULT_MAX_THREADS, os.cpu_count() or 1)
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_THREADS:
        raise CryptoError(f"{THREADS_ENV} must be a whole number in 1..{MAX_THREADS}, got {raw!r}")
    return int(raw)


def plan_threads(threads: int | None, chunks: int, chunk_size: int) -> int:
    """Threads to use for `chunks` chunks: an explicit count is obeyed (up to one per chunk); the
    automatic count (env or CPUs) applies only to chunks large enough to gain from it."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise CryptoError(f"threads must be a whole number in 1..{MAX_THREADS}, got {threads!r}")
        return max(1, min(threads, chunks))
    wanted = default_threads()
    if chunk_size < MIN_PARALLEL_CHUNK:
        return 1
    return max(1, min(wanted, chunks))


def run_chunks(count: int, work: Callable[[int], bool], threads: int) -> int | None:
    """Call `work(i)` for every i in range(count) on `threads` threads (the caller is one of them).

    Returns the lowest i for which `work` returned False, having run every lower i, or None if all
    passed: the same answer a loop in order that stops at the first failure gives. Chunks are handed
    out in increasing order, so a slow or busy core delays only the chunks it holds.
    """
    if threads <= 1 or count <= 1:
        return next((i for i in range(count) if not work(i)), None)
    claims = itertools.count()  # next() on it is atomic under the GIL
    failed: list[int] = []
    halted: list[bool] = []

    def worker() -> None:
        for i in claims:
            # every index below a recorded failure was claimed before it, so stopping here is safe
            if i >= count or failed or halted:
                return
            try:
                ok = work(i)
            except BaseException:
                halted.append(True)
                raise
            if not ok:
                failed.append(i)
                return

    helpers = _submit(worker, threads - 1)
    try:
        worker()
    except BaseException:
        _join(helpers, reraise=False)
        raise
    _join(helpers, reraise=True)
    return min(failed) if failed else None


def _submit(fn: Callable[[], None], count: int) -> list[Future[None]]:
    try:
        pool = _POOL.get()
        return [pool.submit(fn) for _ in range(count)]
    except RuntimeError:  # interpreter shutdown: the calling thread does all the work
        return []


def _join(helpers: list[Future[None]], *, reraise: bool) -> None:
    """Wait for every helper (the buffers must outlive all writers); re-raise the first helper error."""
    errors = []
    for future in helpers:
        if future.cancel():  # never started: the caller already drained the work
            continue
        exc = future.exception()
        if exc is not None:
            errors.append(exc)
    if errors and reraise:
        raise errors[0]


class Window:
    """Jobs on the pool, at most `depth` in flight, taken back oldest first (the streams' frame order).

    `close()` waits for every job still running: they write into the caller's buffers, which must
    outlive them even when the caller gives up on an error.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._pending: deque[tuple[int, Future[bool]]] = deque()

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.depth

    def submit(self, tag: int, fn: Callable[[], bool]) -> None:
        try:
            future = _POOL.get().submit(fn)
        except RuntimeError:  # interpreter shutdown: run it here
            future = Future()
            future.set_result(fn())
        self._pending.append((tag, future))

    def pop(self) -> tuple[int, bool]:
        """The oldest job's tag and result (re-raising its error)."""
        tag, future = self._pending.popleft()
        return tag, future.result()

    def close(self) -> None:
        while self._pending:
            _, future = self._pending.popleft()
            if not future.cancel():
                future.exception()
