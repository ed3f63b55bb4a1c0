"""A run's input on the node: sealed as the server holds it, then decrypted for the container.

A small input the claim brought along stays in memory. Any other is downloaded into the run folder and
decrypted there file to file (vfed.common.crypto.decrypt_file: frames in reusable buffers, the plaintext
renamed into place only once the signature verified), so a big input never sits in the agent's memory. The
checks read the TaskInput's method and small keyword arguments (`header`): from memory, or from the file by
vfed.node.input_header without loading the big arguments.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from vfed.common.crypto import Keyring, SenderLookup, decrypt_bytes, decrypt_file
from vfed.common.payload import TaskInput
from vfed.node.input_header import read_header
from vfed.node.runtime.base import INPUT_NAME

SEALED_INPUT_NAME = "input.sealed"  # the downloaded envelope, removed once decrypted
_HASH_CHUNK_BYTES = 1 << 20


@dataclass
class SealedInput:
    """The envelope: its bytes (from the claim) or its file in the run folder."""

    data: bytes | None = None
    path: Path | None = None
    size: int = 0

    def sha256(self) -> str:
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        assert self.path is not None
        digest = hashlib.sha256()
        with self.path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()


@dataclass
class RunInput:
    """The plaintext: `data` when small, else the decrypted file `path` the container reads."""

    data: bytes | None = None
    path: Path | None = None
    size: int = 0
    _header: TaskInput | None = field(default=None, repr=False)

    @classmethod
    def of(cls, data: bytes) -> RunInput:
        return cls(data=data, size=len(data))

    async def header(self) -> TaskInput:
        """The method and the small keyword arguments (args are not read from a file); ValueError
        (pydantic's ValidationError among them) when the input is not a TaskInput."""
        if self._header is None:
            if self.data is not None:
                self._header = TaskInput.from_json(self.data)
            else:
                assert self.path is not None
                self._header = await asyncio.to_thread(_header_of_file, self.path)
        return self._header


def decrypt_sealed(sealed: SealedInput, keyring: Keyring, sender: SenderLookup, context: bytes) -> RunInput:
    """The plaintext: in memory for an envelope in memory, else the file INPUT_NAME beside the envelope's
    (which is removed, decrypted or not). CryptoError when it does not decrypt."""
    if sealed.data is not None:
        return RunInput.of(decrypt_bytes(sealed.data, keyring, sender, context=context))
    assert sealed.path is not None
    target = sealed.path.with_name(INPUT_NAME)
    try:
        decrypt_file(sealed.path, target, keyring, sender, context=context)
    finally:
        sealed.path.unlink(missing_ok=True)
    return RunInput(path=target, size=target.stat().st_size)


def _header_of_file(path: Path) -> TaskInput:
    with path.open("rb") as fh:
        return read_header(fh)
