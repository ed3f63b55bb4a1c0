"""One job of `fast.preverify`, done in a worker process (or on a thread here): for each entry, its signed
message, the message's digest, the SHA-256 of its canonical entry JSON (what the chain links) and which of the
named signatures verify.

Imports nothing but the standard library and `nacl.bindings`: a worker runs this file's source as
`python -I -c` (fast.py), so it starts in about 30 ms and never imports vfed. Its jobs come from the verifying
process with `marshal`: each entry's body as the verifier parsed it (never text a server sent; marshal carries
exactly those types, and refuses anything else, which the verifier then does itself), its kind, version and
signatures. The worker makes the signed message as `SignedEntry.message()` does (`signing_message`: the same
canonical JSON, `CANONICAL`), checks the signatures on it, and, when the body holds only what JSON text
decodes to, the canonical entry JSON around it, as `vfed.common.ledger.chain.entry_json` makes it with
`entry_text` (else the verifier makes that itself). An entry this cannot handle is answered with None and the
verifier does it itself, so it reports what is wrong in order.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import marshal
import os
import signal
import struct
import sys
from typing import Any

from nacl.bindings import crypto_sign_open

SIGN_DOMAIN = b"vfed/entry/v1\x00"

Check = tuple[int, bytes]
"""A signature to check: its index in the entry's signatures and the Ed25519 key it claims."""
Item = tuple[dict[str, Any], str, int, tuple[tuple[str, str], ...], tuple[Check, ...]]
"""An entry as sent: its body, kind, version, signatures as (key id, signature text), and the checks to
make."""
Result = tuple[str, bytes | None, bytes] | None
"""The digest (hex), the SHA-256 of the canonical entry JSON (None: not made here), one byte per check (1:
it verified); None when nothing was made here."""

NICE = 3
"""A worker's niceness. The verifying process's sequential pass is the critical path of a bulk check, and one
worker per CPU leaves it no core of its own: at equal priority the scheduler gives each of the three busy
processes on two cores two thirds of one, and the sequential pass runs a third slower while the workers are
busy. At nice 3 (weight 526 against 1024) the workers of two cores weigh about as much as the verifying
process: it keeps a core, they share the other and whatever it leaves idle."""
CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""`vfed.common.trust.entries`'s canonical JSON encoder (tests/common/test_ledger_fast.py: the same)."""
_SCALARS = frozenset({str, int, float, bool, type(None)})
_text = json.encoder.encode_basestring  # json.dumps(text, ensure_ascii=False), without making an encoder


def json_native(value: object) -> bool:
    """Dicts with text keys, lists, text, numbers, true, false and null, as `json.loads` makes them."""
    try:
        return _native(value)
    except RecursionError:  # nested deeper than this can walk: not known to be native
        return False


def _native(value: Any) -> bool:
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or (type(item) not in _SCALARS and not _native(item)):
                return False
        return True
    if kind is list:
        for item in value:  # noqa: SIM110 (a loop: all() of a generator costs more per list)
            if type(item) not in _SCALARS and not _native(item):
                return False
        return True
    return kind in _SCALARS


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
    """Raises what `SignedEntry.message()` would raise on a body without canonical form (then the verifier
    makes this entry itself, and says so in order)."""
    body, kind, v, sigs, checks = item
    canonical = CANONICAL.encode(body).encode("utf-8")
    message = SIGN_DOMAIN + kind.encode("utf-8") + b"\x00" + canonical
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
    if type(v) is int and json_native(body):
        with contextlib.suppress(ValueError):  # text UTF-8 cannot hold: the verifier's to_json says so
            entry_hash = hashlib.sha256(entry_text(canonical, kind, sigs, v)).digest()
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
    Ignores ^C (the parent decides); ends when its input ends. Runs at `NICE`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICE)
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
