"""A file another thread or task is still writing, read as if it were complete: the reader follows the writer.

A download's partial file decrypted while it downloads (the researcher's client), a sealed result uploaded
while it is sealed (the node): the bytes are written once and read back from the page cache while they are
fresh, instead of a second pass over the whole file after the first. The writer says it is over (success or
not) by setting an Event; until then a read that finds no new byte waits, polling every POLL_S.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

POLL_S = 0.005


class GrowingFile:
    """`read` as on a complete file: a read that finds no new byte waits until bytes come or the writer is
    over (`done`); then the end of the file is the end. The file is the first of `paths` that exists (a
    writer that renames its temporary file when finished: the temporary, then the final name); none yet
    reads as empty until one appears or the writer is over."""

    def __init__(self, paths: Path | Sequence[Path], done: threading.Event) -> None:
        self.paths = [paths] if isinstance(paths, Path) else list(paths)
        self.done = done
        self._file: BinaryIO | None = None

    def read(self, size: int = -1) -> bytes:
        while True:
            over = self.done.is_set()  # looked at before the file: bytes written before it count
            if self._file is None:
                self._file = _open_first(self.paths)
            data = self._file.read(size) if self._file is not None else b""
            if data or over:
                return data
            self.done.wait(POLL_S)

    def seek(self, offset: int) -> None:
        """Go to `offset`, which the writer has passed (a reader resuming where it was); OSError if no file
        exists yet."""
        if self._file is None:
            self._file = _open_first(self.paths)
        if self._file is None:
            raise FileNotFoundError(f"none of {[str(p) for p in self.paths]} exists")
        self._file.seek(offset)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> GrowingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_first(paths: Sequence[Path]) -> BinaryIO | None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            return path.open("rb")
    return None
