"""Fault a fresh output's pages in with one system call per chunk (Linux `MADV_POPULATE_WRITE`).

A new large `bytes` is untouched calloc'd memory, so the first write to each 4 KiB page traps into
the kernel; at 100 MiB those faults cost more than AES-GCM. Asking the kernel to populate a chunk's
pages in one `madvise` call, in the worker thread right before it writes the chunk, does the same
work without a trap per page. Kernels before 5.14 answer EINVAL (probed once): the pages then fault
on first write exactly as before. Populating changes no byte of the output. Only new pages are worth
it: a block the allocator reused (and calloc zero-filled, so its pages are there) is left alone, which
`fresh` tells with one `mincore` call (at 1 MiB, populating reused pages cost ~20% per call).

Off switches: `VFED_CRYPTO_POPULATE=0` in the environment, or `populate.enabled = False`.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from collections.abc import Callable
from typing import Any

POPULATE_ENV = "VFED_CRYPTO_POPULATE"
MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14; Python's mmap module does not name it
PAGE_BYTES = mmap.PAGESIZE
# A range with fewer whole pages saves too few faults to pay for the call.
MIN_SPAN_BYTES = 16 * PAGE_BYTES

# Module switch (tests compare outputs with and without the populate path).
enabled = True

Madvise = Callable[[int, int, int], int]
Mincore = Callable[[int, int, Any], int]


def _libc(name: str, argtypes: list[Any]) -> Any:
    """A libc function through ctypes, which releases the GIL for the call; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_madvise: Madvise | None = _libc("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
_mincore: Mincore | None = _libc("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])


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


def fresh(address: int, length: int) -> bool:
    """Whether the last whole page of [address, address + length) is not mapped in yet.

    A large calloc'd block is either a new mapping (nothing mapped: populating saves a fault per
    page) or reused heap memory that calloc has just zero-filled (all mapped: populating would only
    walk pages that are there, which costs more than it saves). One `mincore` on one page tells which.
    """
    if _mincore is None:
        return False
    last = (address + length) // PAGE_BYTES * PAGE_BYTES - PAGE_BYTES
    if last < address:
        return False
    resident = ctypes.c_ubyte(1)
    if _mincore(last, PAGE_BYTES, ctypes.byref(resident)) != 0:
        return False
    return not resident.value & 1


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
