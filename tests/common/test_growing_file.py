"""GrowingFile: a reader that follows a writer gets every byte in order, ends only when the writer is over,
finds the file under its final name when the writer renamed it first, and reads nothing when there is none."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from vfed.common.growing_file import GrowingFile


def _writer(tmp: Path, final: Path, chunks: list[bytes], done: threading.Event, pause_s: float) -> None:
    try:
        with tmp.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
                out.flush()
                time.sleep(pause_s)
        os.replace(tmp, final)
    finally:
        done.set()


def _read_all(source: GrowingFile, size: int) -> bytes:
    parts = []
    while piece := source.read(size):
        parts.append(piece)
    return b"".join(parts)


def test_the_reader_follows_the_writer_to_the_end(tmp_path: Path) -> None:
    chunks = [os.urandom(100_000 + i) for i in range(20)]
    done = threading.Event()
    tmp, final = tmp_path / ".out.tmp", tmp_path / "out"
    writer = threading.Thread(target=_writer, args=(tmp, final, chunks, done, 0.01))
    with GrowingFile([tmp, final], done) as source:
        writer.start()  # the reader was there first: it waits for the file, then for each chunk
        got = _read_all(source, 65536)
    writer.join()
    assert got == b"".join(chunks)


def test_a_writer_already_finished_is_read_under_its_final_name(tmp_path: Path) -> None:
    done = threading.Event()
    tmp, final = tmp_path / ".out.tmp", tmp_path / "out"
    _writer(tmp, final, [b"abc", b"def"], done, 0)
    with GrowingFile([tmp, final], done) as source:
        assert _read_all(source, 2) == b"abcdef"


def test_no_file_and_a_writer_that_gave_up_read_as_empty(tmp_path: Path) -> None:
    done = threading.Event()
    done.set()
    with GrowingFile(tmp_path / "never", done) as source:
        assert source.read(10) == b""
