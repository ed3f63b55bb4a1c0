"""The organization's private key file: every key it ever held, newest first in use.

Old keys stay so results sealed to them remain readable after a rotation. The file is JSON, mode 0600,
optionally sealed with a passphrase (argon2id from libsodium, then SecretBox).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.utils
from nacl.secret import SecretBox

from .errors import CorruptKey, CryptoError, InsecureKeyFile, KeyFileMissing, UnknownVersion, WrongPassphrase
from .keys import OrgKey

FORMAT_VERSION = 1
KDF_NAME = "argon2id13"
DEFAULT_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
DEFAULT_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_MODERATE
# A hostile file must not make us allocate gigabytes or spin for minutes before failing.
MAX_MEMLIMIT = 1 << 30
MAX_OPSLIMIT = 32
MAX_FILE_BYTES = 4 << 20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise CorruptKey(f"key file field {what!r} must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CorruptKey(f"key file field {what!r} is not valid base64") from exc


def _derive(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return nacl.pwhash.argon2id.kdf(
        SecretBox.KEY_SIZE, passphrase.encode("utf-8"), salt, opslimit=opslimit, memlimit=memlimit
    )


class Keyring:
    """All private keys of one organization; `.current` encrypts and signs, all of them decrypt."""

    def __init__(self, keys: Sequence[OrgKey]) -> None:
        if not keys:
            raise CorruptKey("a keyring holds at least one key")
        self._keys = list(keys)

    @classmethod
    def generate(cls) -> Keyring:
        return cls([OrgKey.generate(created_s=int(time.time()))])

    @property
    def keys(self) -> list[OrgKey]:
        """Oldest first; the last one is current."""
        return list(self._keys)

    @property
    def current(self) -> OrgKey:
        return self._keys[-1]

    def rotate(self) -> OrgKey:
        """Add a new current key; older keys stay for decrypting what was sealed to them."""
        key = OrgKey.generate(created_s=int(time.time()))
        self._keys.append(key)
        return key

    def get(self, key_id: str) -> OrgKey | None:
        for key in self._keys:
            if key.key_id == key_id:
                return key
        return None

    def __contains__(self, key_id: object) -> bool:
        return isinstance(key_id, str) and self.get(key_id) is not None

    # ---- file format -------------------------------------------------------------------------

    def _keys_doc(self) -> list[dict[str, Any]]:
        return [
            {"x25519": _b64(k.x25519_secret), "ed25519": _b64(k.ed25519_seed), "created_s": k.created_s}
            for k in self._keys
        ]

    def to_document(
        self,
        passphrase: str | None = None,
        *,
        opslimit: int = DEFAULT_OPSLIMIT,
        memlimit: int = DEFAULT_MEMLIMIT,
    ) -> dict[str, Any]:
        """The JSON document written by `save`; with a passphrase the keys are a SecretBox blob."""
        doc: dict[str, Any] = {"vfed_keyring": FORMAT_VERSION}
        if passphrase is None:
            doc["protection"] = "none"
            doc["keys"] = self._keys_doc()
            return doc
        if not passphrase:
            raise WrongPassphrase("refusing to protect a key file with an empty passphrase")
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        box = SecretBox(_derive(passphrase, salt, opslimit, memlimit))
        inner = json.dumps({"keys": self._keys_doc()}).encode()
        doc["protection"] = "argon2id+secretbox"
        doc["kdf"] = {"name": KDF_NAME, "opslimit": opslimit, "memlimit": memlimit, "salt": _b64(salt)}
        doc["ciphertext"] = _b64(bytes(box.encrypt(inner)))
        return doc

    def save(
        self,
        path: str | os.PathLike[str],
        passphrase: str | None = None,
        *,
        opslimit: int = DEFAULT_OPSLIMIT,
        memlimit: int = DEFAULT_MEMLIMIT,
    ) -> None:
        """Write atomically with mode 0600 (temp file in the same folder, fsync, rename)."""
        target = Path(path)
        data = json.dumps(self.to_document(passphrase, opslimit=opslimit, memlimit=memlimit), indent=1)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".vfed-key-", dir=target.parent)
        except OSError as exc:
            raise CryptoError(f"cannot write key file {target}: {exc.strerror}") from exc
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(data + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: str | None = None) -> Keyring:
        """Read a key file; refuse it when group or others may read or write it."""
        return cls.from_document(_read_private_file(Path(path)), passphrase)

    @classmethod
    def from_document(cls, raw: bytes, passphrase: str | None = None) -> Keyring:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptKey("key file is not JSON") from exc
        if not isinstance(doc, dict) or "vfed_keyring" not in doc:
            raise CorruptKey("key file is not a vfed keyring")
        if doc["vfed_keyring"] != FORMAT_VERSION:
            raise UnknownVersion(f"key file format version {doc['vfed_keyring']!r} is not supported")
        protection = doc.get("protection")
        if protection == "none":
            return cls(_parse_keys(doc.get("keys")))
        if protection == "argon2id+secretbox":
            return cls(_parse_keys(_open_protected(doc, passphrase).get("keys")))
        raise CorruptKey(f"key file protection {protection!r} is unknown")


def _read_private_file(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise KeyFileMissing(f"key file {path} does not exist") from exc
    except OSError as exc:
        raise KeyFileMissing(f"key file {path} cannot be opened: {exc.strerror}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise KeyFileMissing(f"key file {path} is not a regular file")
        if mode & 0o077:
            raise InsecureKeyFile(
                f"key file {path} has mode {stat.S_IMODE(mode):04o}; group/others must have no access "
                f"(run: chmod 600 {path})"
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise CorruptKey(f"key file {path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def _open_protected(doc: dict[str, Any], passphrase: str | None) -> dict[str, Any]:
    if passphrase is None:
        raise WrongPassphrase("key file is passphrase-protected and no passphrase was given")
    kdf = doc.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != KDF_NAME:
        raise CorruptKey("key file names no supported key derivation (argon2id13)")
    opslimit, memlimit = kdf.get("opslimit"), kdf.get("memlimit")
    if not isinstance(opslimit, int) or not isinstance(memlimit, int):
        raise CorruptKey("key file kdf limits must be integers")
    if not (1 <= opslimit <= MAX_OPSLIMIT and 8192 <= memlimit <= MAX_MEMLIMIT):
        raise CorruptKey(f"key file kdf limits out of range (opslimit={opslimit}, memlimit={memlimit})")
    salt = _unb64(kdf.get("salt"), "kdf.salt")
    if len(salt) != nacl.pwhash.argon2id.SALTBYTES:
        raise CorruptKey("key file kdf salt has the wrong length")
    blob = _unb64(doc.get("ciphertext"), "ciphertext")
    try:
        key = _derive(passphrase, salt, opslimit, memlimit)
    except nacl.exceptions.CryptoError as exc:
        raise CorruptKey("key file kdf parameters are rejected by libsodium") from exc
    try:
        inner = SecretBox(key).decrypt(blob)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as exc:
        raise WrongPassphrase("wrong passphrase for key file (or the file was altered)") from exc
    try:
        parsed = json.loads(inner)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptKey("protected key file content is not JSON") from exc
    if not isinstance(parsed, dict):
        raise CorruptKey("protected key file content is not an object")
    return parsed


def _parse_keys(entries: object) -> list[OrgKey]:
    if not isinstance(entries, list) or not entries:
        raise CorruptKey("key file holds no keys")
    keys = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CorruptKey(f"key file entry {number} is not an object")
        created = entry.get("created_s", 0)
        if not isinstance(created, int):
            raise CorruptKey(f"key file entry {number} has a non-integer created_s")
        x_secret = _unb64(entry.get("x25519"), f"keys[{number}].x25519")
        ed_seed = _unb64(entry.get("ed25519"), f"keys[{number}].ed25519")
        keys.append(OrgKey(x_secret, ed_seed, created))
    return keys
