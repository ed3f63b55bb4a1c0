"""Push-style envelope state machines; the bytes, async and file helpers all drive these two classes."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import nacl.bindings as nb
import nacl.exceptions
import nacl.utils

from .aead import ChunkCipher, FreshBytes, OutputBytes, ffi, new_output, pointer, release
from .errors import (
    BadSignature,
    CorruptHeader,
    CorruptKey,
    CryptoError,
    NotARecipient,
    ReorderedChunk,
    TamperedChunk,
    TrailingData,
    TruncatedPayload,
    UnknownSender,
)
from .format import (
    DEFAULT_CHUNK_SIZE,
    FLAG_FINAL,
    FRAME_HEAD,
    FRAME_HEAD_BYTES,
    HEADER_FIXED_BYTES,
    MAGIC,
    MAX_CHUNK_SIZE,
    MAX_RECIPIENTS,
    SIGNATURE_BYTES,
    TAG_BYTES,
    Cipher,
    FramesHash,
    Header,
    aead_for,
    check_context,
    context_digest,
    default_cipher,
    header_hash,
    header_size,
    pack_header,
    read_header,
    signed_message,
)
from .keyring import Keyring
from .keys import OrgKey, PublicKey
from .parallel import Window, plan_threads, run_chunks
from .pieces import Pieces

SenderLookup = PublicKey | Callable[[str], PublicKey | None]
_NACL_ERRORS = (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, nacl.exceptions.TypeError)


class Encryptor:
    """Encrypt once for many recipients; `feed` and `finish` return envelope pieces in order.

    `context` (e.g. a run or task id) binds the envelope to it: the header carries its digest, which
    the header hash, every chunk's AAD and the signature cover; decryption must name the same context.
    """

    def __init__(
        self,
        sender: OrgKey,
        recipients: Sequence[PublicKey],
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        cipher: Cipher | None = None,
        commit: bool | None = None,
        context: bytes | None = None,
    ) -> None:
        digest = context_digest(context) if context is not None else None
        unique = list({r.key_id: r for r in recipients}.values())
        if not unique:
            raise CryptoError("an envelope needs at least one recipient")
        if len(unique) > MAX_RECIPIENTS:
            raise CryptoError(f"an envelope holds at most {MAX_RECIPIENTS} recipients")
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise CryptoError(f"chunk size {chunk_size} is outside 1..{MAX_CHUNK_SIZE}")
        self._aead = aead_for(cipher if cipher is not None else default_cipher())
        self._key = nacl.utils.random(32)
        self._cipher = ChunkCipher(self._aead.cipher, self._key)
        entries = []
        for recipient in unique:
            try:
                sealed = nb.crypto_box_seal(self._key, recipient.x25519)
            except _NACL_ERRORS as exc:
                raise CorruptKey(f"cannot seal to recipient key {recipient.key_id}") from exc
            entries.append((recipient.key_id_bytes, sealed))
        committed = len(unique) > 1 if commit is None else commit
        self.header = pack_header(
            self._aead.cipher, committed, chunk_size, sender.public.key_id_bytes, entries, digest
        )
        self._sender = sender
        self._chunk_size = chunk_size
        self._head_hash = header_hash(self.header)
        self._tags = FramesHash(committed)
        self._buffer = Pieces()
        self._index = 0
        self._header_sent = False
        self._sealed_final = False
        self._finished = False

    def _start(self) -> list[bytes]:
        if self._header_sent:
            return []
        self._header_sent = True
        return [self.header]

    def seal_into(self, out: memoryview, out_ptr: Any, src_ptr: Any, length: int, final: bool) -> int:
        """Write one frame (head, ciphertext, tag) at the start of `out`/`out_ptr`; returns its size.

        The building block for every output shape: per-frame bytes, one whole envelope, file buffers.
        """
        if self._finished or self._sealed_final:
            raise CryptoError("encryptor already finished")
        self._check_length(length, final)
        head = self.seal_frame(out_ptr, src_ptr, self._index, length, final)
        end = FRAME_HEAD_BYTES + length + TAG_BYTES
        with out[FRAME_HEAD_BYTES:end] as sealed:
            self._tags.update(head, sealed)
        self._index += 1
        self._sealed_final = final
        return end

    def _check_length(self, length: int, final: bool) -> None:
        if length > self._chunk_size or (not final and length != self._chunk_size):
            raise CryptoError(f"chunk of {length} bytes breaks chunk size {self._chunk_size}")

    def seal_frame(self, out_ptr: Any, src_ptr: Any, index: int, length: int, final: bool) -> bytes:
        """Write frame `index` at `out_ptr` and return its head; touches no encryptor state, so
        threads may seal different frames at once (the caller hashes them in order afterwards)."""
        head = FRAME_HEAD.pack(index, FLAG_FINAL if final else 0, length)
        ffi.memmove(out_ptr, head, FRAME_HEAD_BYTES)
        nonce = self._aead.nonce(index, final)
        self._cipher.seal(out_ptr + FRAME_HEAD_BYTES, src_ptr, length, self._head_hash + head, nonce)
        return head

    def signature(self) -> bytes:
        """The trailer; only after the final chunk was sealed."""
        if not self._sealed_final or self._finished:
            raise CryptoError("the signature comes once, after the final chunk")
        self._finished = True
        return self._sender.sign(signed_message(self._head_hash, self._tags.digest()))

    def _frame(self, src: bytes, offset: int, length: int, final: bool) -> list[bytes]:
        out = OutputBytes(FRAME_HEAD_BYTES + length + TAG_BYTES)
        src_ptr = pointer(src)
        try:
            self.seal_into(out.view, out.ptr, src_ptr + offset, length, final)
        finally:
            release(src_ptr)
        return [out.done()]

    def feed(self, data: bytes) -> list[bytes]:
        """Accept plaintext; return the envelope bytes ready so far (a chunk is held until more arrives)."""
        if self._finished or self._sealed_final:
            raise CryptoError("encryptor already finished")
        out = self._start()
        self._buffer.push(bytes(data) if not isinstance(data, bytes) else data)
        while self._buffer.size > self._chunk_size:
            src, offset = self._buffer.take_ref(self._chunk_size)
            out += self._frame(src, offset, self._chunk_size, final=False)
        return out

    def finish(self) -> list[bytes]:
        """Emit the final chunk (possibly empty) and the signature trailer."""
        if self._finished or self._sealed_final:
            raise CryptoError("encryptor already finished")
        out = self._start()
        size = self._buffer.size
        src, offset = self._buffer.take_ref(size) if size else (b"", 0)
        out += self._frame(src, offset, size, final=True)
        out.append(self.signature())
        return out

    def seal_all(self, data: bytes, *, threads: int | None = None) -> bytes:
        """The whole envelope for `data` as one bytes object, written in place (no joins).

        Frames are sealed on `threads` threads (see parallel.plan_threads); the output is the same
        bytes for any thread count.
        """
        if self._header_sent or self._index:
            raise CryptoError("seal_all needs a fresh encryptor")
        self._header_sent = True
        size, start = len(data), len(self.header)
        chunks = max(1, -(-size // self._chunk_size))
        total = start + chunks * (FRAME_HEAD_BYTES + TAG_BYTES) + size + SIGNATURE_BYTES
        workers = plan_threads(threads, chunks, self._chunk_size)
        out = new_output(total)
        src_ptr = pointer(data) if size else ffi.NULL
        try:
            ffi.memmove(out.ptr, self.header, start)
            with memoryview(ffi.buffer(out.ptr, total)) as view:
                frames = _Frames(self, view, out, src_ptr, start, size)
                if workers > 1 and self._tags.committed:
                    frames.seal_hashing_alongside(workers)
                else:
                    run_chunks(chunks, frames.seal, workers)
                    for number in range(chunks):
                        frames.hash(number)
            ffi.memmove(out.ptr + total - SIGNATURE_BYTES, self.signature(), SIGNATURE_BYTES)
        finally:
            if size:
                release(src_ptr)
            envelope = out.done()
        return envelope

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    def add_frame(self, head: bytes, sealed: memoryview, final: bool) -> None:
        """Account for a frame made by `seal_frame` (ciphertext || tag in `sealed`), in frame order."""
        self._tags.update(head, sealed)
        self._index += 1
        self._sealed_final = final


class _Frames:
    """One envelope's frames in a flat buffer: frame n sits at a fixed offset, so any thread can seal
    any frame, while the signature's hash takes them in order."""

    def __init__(
        self,
        enc: Encryptor,
        view: memoryview,
        out: OutputBytes | FreshBytes,
        src_ptr: Any,
        start: int,
        size: int,
    ) -> None:
        self.enc, self.view, self.out, self.src_ptr = enc, view, out, src_ptr
        self.start, self.size, self.cs = start, size, enc.chunk_size
        self.count = max(1, -(-size // self.cs))

    def _span(self, number: int) -> tuple[int, int]:
        """(offset of frame `number` in the envelope, its plaintext length)."""
        offset = self.start + number * (FRAME_HEAD_BYTES + self.cs + TAG_BYTES)
        return offset, min(self.cs, self.size - number * self.cs)

    def seal(self, number: int) -> bool:
        offset, length = self._span(number)
        final = number == self.count - 1
        self.out.prefault(offset, FRAME_HEAD_BYTES + length + TAG_BYTES)
        self.enc.seal_frame(self.out.ptr + offset, self.src_ptr + number * self.cs, number, length, final)
        return True

    def hash(self, number: int) -> None:
        offset, length = self._span(number)
        body = offset + FRAME_HEAD_BYTES
        with self.view[body : body + length + TAG_BYTES] as sealed:
            self.enc.add_frame(bytes(self.view[offset:body]), sealed, number == self.count - 1)

    def seal_hashing_alongside(self, workers: int) -> None:
        """Pool threads seal up to `workers` frames ahead while this thread hashes them in order:
        for a committed envelope the SHA-256 costs about as much as the cipher."""
        window = Window(workers)
        try:
            for number in range(self.count):
                if window.full:
                    self.hash(window.pop()[0])
                window.submit(number, functools.partial(self.seal, number))
            while len(window):
                self.hash(window.pop()[0])
        finally:
            window.close()


def resolve_sender(header: Header, sender: SenderLookup) -> PublicKey:
    """Map the header's sender key id to a public key, or raise UnknownSender."""
    if isinstance(sender, PublicKey):
        if sender.key_id != header.sender_key_id:
            raise UnknownSender(
                f"envelope was sent by key {header.sender_key_id}, expected sender key {sender.key_id}"
            )
        return sender
    found = sender(header.sender_key_id)
    if found is None:
        raise UnknownSender(f"sender key {header.sender_key_id} is not known")
    if found.key_id != header.sender_key_id:
        raise UnknownSender(f"lookup for sender key {header.sender_key_id} returned key {found.key_id}")
    return found


def open_content_key(header: Header, keyring: Keyring) -> bytes:
    """Unseal the content key with whichever of our keys the envelope names."""
    for key_id, sealed in zip(header.recipient_key_ids, header.sealed_keys, strict=True):
        key = keyring.get(key_id)
        if key is None:
            continue
        try:
            content_key = nb.crypto_box_seal_open(sealed, key.public.x25519, key.x25519_secret)
        except _NACL_ERRORS as exc:
            raise CorruptHeader(f"sealed content key for recipient {key_id} does not open") from exc
        if len(content_key) != 32:
            raise CorruptHeader(f"sealed content key for recipient {key_id} has the wrong length")
        return content_key
    ours = ", ".join(k.key_id for k in keyring.keys)
    raise NotARecipient(f"none of our keys ({ours}) is among the envelope's recipients")


class Decryptor:
    """Parse and decrypt an envelope fed in pieces of any size.

    `feed` returns plaintext of non-final chunks as soon as they pass AEAD authentication; the final
    chunk comes out only after the sender's signature (the trailer) verifies, and `finish` raises
    unless it did. Callers that must not act on unsigned plaintext buffer it (decrypt_bytes and
    decrypt_file do).

    `context` names the context the envelope must be bound to (None: it must be unbound); a mismatch
    raises ContextMismatch as soon as the header is parsed, before any key work.
    """

    def __init__(self, keyring: Keyring, sender: SenderLookup, *, context: bytes | None = None) -> None:
        self._context_digest = context_digest(context) if context is not None else None
        self._keyring = keyring
        self._sender_lookup = sender
        self._buffer = Pieces()
        self._state = "fixed"
        self._need = HEADER_FIXED_BYTES
        self._fixed = b""
        self._magic_seen = b""
        self.header: Header | None = None
        self.sender: PublicKey | None = None
        self._index = 0
        self._frame: tuple[bytes, bool, int] = (b"", False, 0)
        self._tags = FramesHash(False)
        self._final_plain = b""

    @property
    def wants(self) -> int:
        """Bytes still missing for the next step (0 once done): lets file readers read exact frames."""
        return 0 if self._state == "done" else max(self._need - self._buffer.size, 1)

    @property
    def verified(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> list[bytes]:
        if self._state == "done":
            if data:
                raise TrailingData(f"{len(data)} unexpected bytes after the signature trailer")
            return []
        data = bytes(data) if not isinstance(data, bytes) else data
        if len(self._magic_seen) < len(MAGIC):
            self._check_magic(data)
        self._buffer.push(data)
        out: list[bytes] = []
        while self._state != "done" and self._buffer.size >= self._need:
            if self._state == "frame_body":
                src, offset = self._buffer.take_ref(self._need)
                piece = self._on_frame_body(src, offset)
            else:
                piece = self._step(self._buffer.take(self._need))
            if piece is not None:
                out.append(piece)
        if self._state == "done" and self._buffer.size:
            raise TrailingData(f"{self._buffer.size} unexpected bytes after the signature trailer")
        return out

    def _check_magic(self, data: bytes) -> None:
        """Reject a non-envelope on its first bytes, not only after a full fixed header."""
        self._magic_seen += data[: len(MAGIC) - len(self._magic_seen)]
        if not MAGIC.startswith(self._magic_seen):
            raise CorruptHeader("not a vfed envelope (bad magic bytes)")

    def _step(self, data: bytes) -> bytes | None:
        if self._state == "fixed":
            self._fixed = data
            self._state, self._need = "recipients", header_size(data) - HEADER_FIXED_BYTES
        elif self._state == "recipients":
            self.start(self._fixed + data)
        elif self._state == "frame_head":
            final, length = self.check_frame_head(data)
            self._frame = (data, final, length)
            self._state, self._need = "frame_body", length + TAG_BYTES
        else:
            self.verify(data)
            final_plain, self._final_plain = self._final_plain, b""
            return final_plain
        return None

    def start(self, raw: bytes) -> None:
        """Take the complete header: check its context, resolve the sender, open our content key."""
        header = read_header(raw)
        self._aead = aead_for(header.cipher)
        check_context(header, self._context_digest)
        self.sender = resolve_sender(header, self._sender_lookup)
        self._cipher = ChunkCipher(header.cipher, open_content_key(header, self._keyring))
        self.header = header
        self._tags = FramesHash(header.committed)
        self._head_hash = header_hash(raw)
        self._state, self._need = "frame_head", FRAME_HEAD_BYTES

    def check_frame_head(self, head: bytes, position: int | None = None) -> tuple[bool, int]:
        """Validate the next frame head before its body is read; returns (final, ciphertext length).

        `position` defaults to the next frame to open; a reader ahead of the opening passes its own.
        """
        assert self.header is not None
        index, flags, length = FRAME_HEAD.unpack(head)
        position = self._index if position is None else position
        chunk_size = self.header.chunk_size
        if index != position:
            raise ReorderedChunk(f"chunk {index} arrived at position {position}")
        if flags & ~FLAG_FINAL:
            raise TamperedChunk(f"chunk {position} has unknown flag bits {flags:#04x}")
        final = bool(flags & FLAG_FINAL)
        if length > chunk_size or (not final and length != chunk_size):
            raise TamperedChunk(f"chunk {position} claims {length} bytes; chunk size is {chunk_size}")
        return final, length

    def open_into(self, out_ptr: Any, head: bytes, src: bytes | bytearray, offset: int) -> None:
        """Authenticate and decrypt the body that follows `head` (at src[offset:]) into `out_ptr`."""
        _, _, length = FRAME_HEAD.unpack(head)
        position = self._index
        end = offset + length + TAG_BYTES
        if len(src) < end:
            raise TruncatedPayload(f"envelope ends inside chunk {position}")
        src_ptr = pointer(src)
        try:
            ok = self.open_frame(out_ptr, src_ptr + offset, position, head)
        finally:
            release(src_ptr)
        if not ok:
            raise self.tampered(position)
        with memoryview(src)[offset:end] as body:
            self._tags.update(head, body)
        self._index += 1

    def open_frame(self, out_ptr: Any, body_ptr: Any, index: int, head: bytes) -> bool:
        """Open frame `index` (its checked `head`, its body at `body_ptr`) into `out_ptr`; False if it
        fails authentication. Touches no decryptor state, so threads may open frames at once."""
        _, flags, length = FRAME_HEAD.unpack(head)
        nonce = self._aead.nonce(index, bool(flags & FLAG_FINAL))
        return self._cipher.open(out_ptr, body_ptr, length + TAG_BYTES, self._head_hash + head, nonce)

    @staticmethod
    def tampered(index: int) -> TamperedChunk:
        return TamperedChunk(
            f"chunk {index} failed authentication (altered, or spliced from another envelope)"
        )

    def hash_frame(self, head: bytes, sealed: memoryview) -> None:
        """Feed one opened frame (in frame order) to the hash the signature covers."""
        self._tags.update(head, sealed)
        self._index += 1

    def _on_frame_body(self, src: bytes, offset: int) -> bytes | None:
        head, final, length = self._frame
        out = OutputBytes(length)
        try:
            self.open_into(out.ptr, head, src, offset)
        finally:
            plain = out.done()
        if final:
            # The end of the payload is released only with a verified signature (docs/crypto.md).
            self._final_plain = plain
            self._state, self._need = "trailer", SIGNATURE_BYTES
            return None
        self._state, self._need = "frame_head", FRAME_HEAD_BYTES
        return plain

    def verify(self, signature: bytes) -> None:
        """Check the trailer against everything seen; the envelope is done after this."""
        assert self.sender is not None
        try:
            self.sender.verify(signed_message(self._head_hash, self._tags.digest()), signature)
        except BadSignature as exc:
            raise BadSignature(
                f"signature of sender {self.sender.key_id} over header and chunk tags does not verify"
            ) from exc
        self._state = "done"

    def finish(self) -> None:
        """Raise TruncatedPayload unless the whole envelope, signature included, was consumed."""
        if self._state != "done":
            raise self.truncated(self._state, self._buffer.size)

    def truncated(self, state: str, buffered: int, position: int | None = None) -> TruncatedPayload:
        """The error for input ending in `state` with `buffered` bytes of the next part, reading frame
        `position` (default: the next one to open)."""
        index = self._index if position is None else position
        where = {
            "fixed": "inside its header",
            "recipients": "inside its header",
            "frame_body": f"inside chunk {index}",
            "trailer": "before the signature trailer",
        }.get(state)
        if where is None:  # frame_head
            if buffered:
                where = f"inside chunk {index}"
            elif index == 0:
                where = "after the header, before any chunk"
            else:
                where = f"after chunk {index - 1}, which is not the final chunk"
        return TruncatedPayload(f"envelope ends {where}")
