"""One job of `fast.preverify`, done in a worker process (or on a thread here): for each entry, given its
signed message, the message's digest, the SHA-256 of its canonical entry JSON (what the chain links) and
which of the named signatures verify.

Imports nothing but the standard library and `nacl.bindings`: a worker runs this file's source as
`python -I -c` (fast.py), so it starts in about 30 ms and never imports vfed. Its jobs come from the verifying
process with `marshal`: each entry's signed message as the verifier made it (`SignedEntry.message()`, the
canonical JSON of the body it parsed: never text a server sent), its kind, version and signatures, and
whether its body holds only what JSON text decodes to (then its canonical JSON is the message's canonical
body wrapped, as `vfed.common.ledger.chain.entry_json` makes it with `entry_text`; else the verifier makes it
itself). An entry this cannot handle is answered with None and the verifier does it itself, so it reports
what is wrong in order.
"""

from __future__ import annotations

import base64
import hashlib
import json
import marshal
import signal
import struct
import sys
from typing import Any

from nacl.bindings import crypto_sign_open

SIGN_DOMAIN = b"vfed/entry/v1\x00"

Check = tuple[int, bytes]
"""A signature to check: its index in the entry's signatures and the Ed25519 key it claims."""
Item = tuple[bytes, str, int, tuple[tuple[str, str], ...], bool, tuple[Check, ...]]
"""An entry as sent: its signed message, kind, version, signatures as (key id, signature text), whether its
body holds only what JSON text decodes to, and the checks to make."""
Result = tuple[str, bytes | None, bytes] | None
"""The digest (hex), the SHA-256 of the canonical entry JSON (None: not made here), one byte per check (1:
it verified); None when nothing was made here."""

_SCALARS = frozenset({str, int, float, bool, type(None)})
_text = json.encoder.encode_basestring  # json.dumps(text, ensure_ascii=False), without making an encoder


def json_native(value: object) -> bool:
    """Dicts with text keys, lists, text, numbers, true, false and null, as `json.loads` makes them."""
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        kind = type(item)
        if kind is dict:
            for key in item:
                if type(key) is not str:
                    return False
            todo.extend(item.values())
        elif kind is list:
            todo.extend(item)
        elif kind not in _SCALARS:
            return False
    return True


def entry_text(body: bytes, kind: str, sigs: tuple[tuple[str, str], ...], v: int) -> bytes:
    """The canonical entry JSON (UTF-8) around `body`, the canonical body; ValueError when text in it cannot
    be UTF-8 (the caller's `to_json` then says what is wrong)."""
    signatures = ",".join('{"key_id":' + _text(key_id) + ',"sig":' + _text(sig) + "}" for key_id, sig in sigs)
    return b'{"body":%s,"kind":%s,"sigs":[%s],"v":%d}' % (
        body,
        _text(kind).encode("utf-8"),
        signatures.encode("utf-8"),
        v,
    )


def one(item: Item) -> Result:
    message, kind, v, sigs, native, checks = item
    oks = bytearray()
    for index, key in checks:
        try:
            raw = base64.b64decode(sigs[index][1], validate=True)
            if len(raw) != 64:
                raise ValueError("not a signature")
            crypto_sign_open(raw + message, key)
            oks.append(1)
        except Exception:
            oks.append(0)
    entry_hash = None
    if native and type(v) is int:
        try:
            body = message[len(SIGN_DOMAIN) + len(kind.encode("utf-8")) + 1 :]
            entry_hash = hashlib.sha256(entry_text(body, kind, sigs, v)).digest()
        except ValueError:  # text UTF-8 cannot hold: the verifier's to_json says so
            pass
    return hashlib.sha256(message).hexdigest(), entry_hash, bytes(oks)


def work(items: list[Item | None]) -> list[Result]:
    out: list[Result] = []
    for item in items:
        try:
            out.append(None if item is None else one(item))
        except Exception:  # the verifier does this one itself
            out.append(None)
    return out


def main() -> None:
    """Jobs from standard input, answers to standard output, each framed as (job id, bytes) and marshalled.
    Ignores ^C (the parent decides); ends when its input ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    head = struct.Struct(">II")
    src, dst = sys.stdin.buffer, sys.stdout.buffer
    while True:
        raw = src.read(8)
        if len(raw) < 8:
            break
        job, size = head.unpack(raw)
        buf = src.read(size)
        if len(buf) < size:
            break
        try:
            out = marshal.dumps(work(marshal.loads(buf)))
        except Exception:  # the parent checks this job itself
            out = b""
        dst.write(head.pack(job, len(out)) + out)
        dst.flush()


if __name__ == "__main__":
    main()
