"""Fault a fresh output's pages in with one system call per chunk (Linux `MADV_POPULATE_WRITE`).

A new large `bytes` is untouched calloc'd memory, so the first write to each 4 KiB page traps into
the kernel; at 100 MiB those faults cost more than AES-GCM. Asking the kernel to populate a chunk's
pages in one `madvise` call, in the worker thread right before it writes the chunk, does the same
work without a trap per page. Kernels before 5.14 answer EINVAL (probed once): the pages then fault
on first write exactly as before. Populating changes no byte of the output.

Off switches: `VFED_CRYPTO_POPULATE=0` in the environment, or `populate.enabled = False`.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from collections.abc import Callable

POPULATE_ENV = "VFED_CRYPTO_POPULATE"
MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14; Python's mmap module does not name it
PAGE_BYTES = mmap.PAGESIZE
# A range with fewer whole pages saves too few faults to pay for the call.
MIN_SPAN_BYTES = 16 * PAGE_BYTES

# Module switch (tests compare outputs with and without the populate path).
enabled = True

Madvise = Callable[[int, int, int], int]


def _libc_madvise() -> Madvise | None:
    """libc's madvise through ctypes, which releases the GIL for the call; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    madvise: Madvise = fn
    return madvise


_madvise: Madvise | None = _libc_madvise()


@functools.cache
def supported() -> bool:
    """Whether this kernel populates on request: one call on a private anonymous page, once."""
    if _madvise is None:
        return False
    with mmap.mmap(-1, PAGE_BYTES) as probe:
        page = (ctypes.c_char * PAGE_BYTES).from_buffer(probe)
        try:
            ok = _madvise(ctypes.addressof(page), PAGE_BYTES, MADV_POPULATE_WRITE) == 0
        finally:
            del page  # the mmap cannot close while a ctypes view exports its buffer
    return ok


def active() -> bool:
    """Populate for the next output? The switch, the environment and the kernel all say yes."""
    return enabled and os.environ.get(POPULATE_ENV, "").strip() != "0" and supported()


def populate(address: int, length: int) -> None:
    """Populate the whole pages inside [address, address + length) writable.

    Only whole pages inside the range: a page shared with a neighbouring chunk is left to fault, so a
    call never touches memory outside what its caller is about to write. A failure is ignored: the
    pages then fault on first write, as without this call.
    """
    if _madvise is None:
        return
    start = -(-address // PAGE_BYTES) * PAGE_BYTES
    end = (address + length) // PAGE_BYTES * PAGE_BYTES
    if end - start >= MIN_SPAN_BYTES:
        _madvise(start, end - start, MADV_POPULATE_WRITE)
