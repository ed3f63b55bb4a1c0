"""Cross-language vectors for the chaincode's tests, made at test time by the project's own Python code.

Usage: python make_vectors.py OUT.json

Writes what Python says about entry texts (canonical message, digest and entry JSON, or that it refuses
them), key texts, signatures, BLAKE2b, chain links, and whole ledger sequences (ledger_vectors.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import struct
import sys
import time
from typing import Any

import nacl.bindings
from ledger_vectors import People, main_sequence, mutations, stricter_sequences

from vfed.common.crypto import OrgKey, PublicKey
from vfed.common.crypto.keys import PUBLIC_TEXT_PREFIX
from vfed.common.ledger import link
from vfed.common.trust import SignedEntry
from vfed.common.trust.entries import sign_entry
from vfed.common.trust.errors import TrustError


# -- canonical JSON ------------------------------------------------------------------------------------------
def canonical_case(
    name: str, body_text: str, *, entry_text: str | None = None, stricter: str = ""
) -> dict[str, Any]:
    text = (
        entry_text
        if entry_text is not None
        else '{"v":1,"kind":"test.canonical","body":' + body_text + ',"sigs":[]}'
    )
    case: dict[str, Any] = {"name": name, "text": text}
    try:
        entry = SignedEntry.parse(text)
        message = entry.message()
        case.update(ok=True, message_hex=message.hex(), digest=entry.digest, json=entry.to_json())
    except TrustError as exc:
        case.update(ok=False, error=exc.message)
    if stricter:
        case["stricter"] = stricter
    return case


def canonical_cases() -> list[dict[str, Any]]:
    big = "1" + "0" * 4299
    cases = [
        canonical_case("floats", '{"a":0.1,"b":1e-07,"c":1e+16,"d":2.5,"e":1e16,"f":100.0,"g":1E2,"h":-0.0}'),
        canonical_case(
            "float edges",
            '{"a":5e-324,"b":1.7976931348623157e308,"c":1e-5,"d":0.0001,"e":1e15,"f":123456789.123456789}',
        ),
        canonical_case("float underflow", '{"a":1e-400,"b":-1e-400}'),
        canonical_case("float overflow", '{"a":1e400}'),
        canonical_case(
            "big ints",
            '{"a":18446744073709551616,"b":-1000000000000000000000000000000000000000,"c":9007199254740993}',
        ),
        canonical_case("int of 4300 digits", '{"a":' + big + "}"),
        canonical_case("int of 4301 digits", '{"a":' + big + "0}"),
        canonical_case(
            "key order by code point", '{"\\ud83d\\ude00":1,"\ue000":2,"z":3,"Z":4,"\u00e9":5,"":6}'
        ),
        canonical_case(
            "escapes",
            '{"a":"\\u0000\\u0001\\b\\t\\n\\f\\r\\u001f\\u007f\\"\\\\\\/\\u2028\\u00e9\\ud83d\\ude00"}',
        ),
        canonical_case("raw unicode", '{"a":"\u00e9\u4e2d\U0001f600\u2029"}'),
        canonical_case("raw control character", '{"a":"\x01"}'),
        canonical_case("lone surrogate", '{"a":"\\ud800"}'),
        canonical_case("lone low surrogate", '{"a":"\\udc00x"}'),
        canonical_case("NaN", '{"a":NaN}'),
        canonical_case("Infinity", '{"a":Infinity}'),
        canonical_case("leading zero", '{"a":01}'),
        canonical_case("trailing comma", '{"a":1,}'),
        canonical_case("duplicate keys", '{"a":1,"a":2.0}'),
        canonical_case("nesting and literals", '{"a":[1,[2,{"b":null}],true,false,{}],"c":{"d":[]}}'),
        canonical_case("white space", ' { "a" : [ 1 , 2 ] }\n'),
        canonical_case("empty body", "{}"),
        canonical_case("not json", "", entry_text='{"v":1,"kind":"x","body":'),
        canonical_case("trailing text", "", entry_text='{"v":1,"kind":"x","body":{}} x'),
        canonical_case("byte order mark", "", entry_text='\ufeff{"v":1,"kind":"x","body":{}}'),
        canonical_case("extra field", "", entry_text='{"v":1,"kind":"x","body":{},"extra":1}'),
        canonical_case("no body", "", entry_text='{"v":1,"kind":"x"}'),
        canonical_case("body not an object", "", entry_text='{"v":1,"kind":"x","body":[]}'),
        canonical_case("empty kind", "", entry_text='{"v":1,"kind":"","body":{}}'),
        canonical_case(
            "kind of 64 characters", "", entry_text='{"v":1,"kind":"' + "\U0001f600" * 64 + '","body":{}}'
        ),
        canonical_case("kind of 65 characters", "", entry_text='{"v":1,"kind":"' + "k" * 65 + '","body":{}}'),
        canonical_case("version 2", "", entry_text='{"v":2,"kind":"x","body":{}}'),
        canonical_case("no version", "", entry_text='{"kind":"x","body":{}}'),
        canonical_case("nine signatures", "", entry_text=_sigs_text(9)),
        canonical_case("eight signatures", "", entry_text=_sigs_text(8)),
        canonical_case(
            "bad key id",
            "",
            entry_text='{"v":1,"kind":"x","body":{},"sigs":[{"key_id":"AB","sig":"' + "A" * 86 + '=="}]}',
        ),
        canonical_case(
            "short signature",
            "",
            entry_text='{"v":1,"kind":"x","body":{},"sigs":[{"key_id":"' + "a" * 32 + '","sig":"AA"}]}',
        ),
        canonical_case(
            "signature of 44 characters outside the BMP",
            "",
            entry_text='{"v":1,"kind":"x","body":{},"sigs":[{"key_id":"'
            + "a" * 32
            + '","sig":"'
            + "\U0001f600" * 44
            + '"}]}',
        ),
        canonical_case(
            "signature of 86 characters outside the BMP",
            "",
            entry_text='{"v":1,"kind":"x","body":{},"sigs":[{"key_id":"'
            + "a" * 32
            + '","sig":"'
            + "\U0001f600" * 86
            + '"}]}',
        ),
        canonical_case("oversize", '{"a":"' + "x" * (1 << 20) + '"}'),
        canonical_case(
            "version as text",
            "",
            entry_text='{"v":"1","kind":"x","body":{}}',
            stricter="JSON types Python coerces",
        ),
        canonical_case(
            "version as float",
            "",
            entry_text='{"v":1.0,"kind":"x","body":{}}',
            stricter="JSON types Python coerces",
        ),
    ]
    rng = random.Random(15)
    floats: list[float] = []
    while len(floats) < 400:
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(value):
            floats.append(value)
    floats += [rng.uniform(-1e6, 1e6) for _ in range(100)] + [
        rng.randint(1, 10**6) / 10 ** rng.randint(0, 12) for _ in range(100)
    ]
    # 17 significant digits, not the shortest form: the reader must find Python's shortest repr itself.
    body = (
        "{"
        + ",".join(f'"f{i:03d}":{value:.17g}' for i, value in enumerate(floats)).replace("inf", "1e999")
        + "}"
    )
    cases.append(canonical_case("random floats", body))
    return cases


def _sigs_text(n: int) -> str:
    sigs = ",".join('{"key_id":"' + f"{i:032x}" + '","sig":"' + "A" * 86 + '=="}' for i in range(n))
    return '{"v":1,"kind":"x","body":{},"sigs":[' + sigs + "]}"


# -- keys ----------------------------------------------------------------------------------------------------
def _key_text(x25519: bytes, ed25519: bytes) -> str:
    raw = x25519 + ed25519
    check = hashlib.blake2b(raw, digest_size=4, person=b"vfed-pk-check").digest()
    return PUBLIC_TEXT_PREFIX + base64.urlsafe_b64encode(raw + check).decode().rstrip("=")


def key_case(name: str, text: str) -> dict[str, Any]:
    try:
        key = PublicKey.from_text(text)
        return {"name": name, "text": text, "ok": True, "key_id": key.key_id}
    except Exception as exc:  # CorruptKey and what from_text raises for damaged text
        return {"name": name, "text": text, "ok": False, "error": str(exc)}


def key_cases() -> list[dict[str, Any]]:
    good = OrgKey.generate().public
    x, ed = good.x25519, good.ed25519
    order4 = bytes(32)  # y = 0: a point of order 4
    torsioned = nacl.bindings.crypto_core_ed25519_add(ed, order4)
    y1 = (1).to_bytes(32, "little")
    cases = [key_case(f"generated {i}", OrgKey.generate().public.to_text()) for i in range(5)]
    cases += [
        key_case("bad checksum", good.to_text()[:-2] + ("AA" if not good.to_text().endswith("AA") else "BB")),
        key_case("identity ed25519", _key_text(x, y1)),
        key_case("order-4 ed25519", _key_text(x, order4)),
        key_case("ed25519 with a torsion part", _key_text(x, torsioned)),
        key_case("non-canonical ed25519", _key_text(x, ((1 << 255) - 19 + 1).to_bytes(32, "little"))),
        key_case("low-order x25519", _key_text(bytes(32), ed)),
        key_case(
            "x25519 of order 8",
            _key_text(bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"), ed),
        ),
        key_case("wrong prefix", "vfedpk2:" + good.to_text()[8:]),
        key_case("truncated", good.to_text()[:-4]),
    ]
    cases += [key_case(f"y={y}", _key_text(x, y.to_bytes(32, "little"))) for y in range(2, 10)]
    return cases


def signature_cases() -> list[dict[str, Any]]:
    """Signatures Python refuses although OpenSSL's plain check might not: R of small order, S >= L."""
    key = OrgKey.generate()
    good = sign_entry("test.sig", {"a": 1}, [key])
    message = good.message()
    raw = base64.b64decode(good.sigs[0].sig)
    ell = (1 << 252) + 27742317777372353535851937790883648493
    s = int.from_bytes(raw[32:], "little")
    # R = identity with S = h*a: the cofactorless equation holds (OpenSSL would accept); libsodium refuses R.
    digest = bytearray(hashlib.sha512(key.ed25519_seed).digest()[:32])
    digest[0] &= 248
    digest[31] = (digest[31] & 127) | 64
    identity = (1).to_bytes(32, "little")
    hram = int.from_bytes(hashlib.sha512(identity + key.public.ed25519 + message).digest(), "little") % ell
    variants = {
        "valid": raw,
        "R identity with S = h*a": identity
        + (hram * int.from_bytes(digest, "little") % ell).to_bytes(32, "little"),
        "S plus L": raw[:32] + (s + ell).to_bytes(32, "little") if s + ell < 1 << 256 else raw,
        "R identity": (1).to_bytes(32, "little") + raw[32:],
        "flipped bit": bytes([raw[0] ^ 1]) + raw[1:],
    }
    out = []
    for name, sig in variants.items():
        try:
            key.public.verify(message, sig)
            ok = True
        except Exception:  # BadSignature
            ok = False
        out.append(
            {
                "name": name,
                "key": key.public.to_text(),
                "message_hex": message.hex(),
                "sig": base64.b64encode(sig).decode(),
                "ok": ok,
            }
        )
    return out


def blake2b_cases() -> list[dict[str, Any]]:
    rng = random.Random(7)
    out = []
    for n in (0, 1, 64, 127, 128, 129, 255, 256, 1000):
        data = bytes(rng.getrandbits(8) for _ in range(n))
        for size, person in (
            (16, b"vfed-key-id"),
            (4, b"vfed-pk-check"),
            (64, b""),
            (32, b"0123456789abcdef"),
        ):
            digest = hashlib.blake2b(data, digest_size=size, person=person).hexdigest()
            out.append({"data_hex": data.hex(), "size": size, "person_hex": person.hex(), "digest": digest})
    return out


def main() -> None:
    now = int(time.time())
    vectors = {
        "canonical": canonical_cases(),
        "keys": key_cases(),
        "signatures": signature_cases(),
        "blake2b": blake2b_cases(),
        "link": [
            {"collab": str(c), "seq": str(n), "prev": h, "json": j, "hash": link(c, n, h, j)}
            for c, n, h, j in ((1, 1, "0" * 64, "{}"), (2**63, 2**64 - 1, "ab" * 32, '{"a":"\u00e9"}'))
        ],
        "sequences": [main_sequence(People(), now).out(), *(s.out() for s in stricter_sequences(now))],
        "mutations": mutations(now),
    }
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        json.dump(vectors, out, ensure_ascii=False)


if __name__ == "__main__":
    main()
