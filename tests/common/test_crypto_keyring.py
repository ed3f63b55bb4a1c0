"""The private key file: permissions, passphrase protection, corruption and key rotation."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import nacl.pwhash
import pytest

from vfed.common.crypto import (
    CorruptKey,
    InsecureKeyFile,
    KeyFileMissing,
    Keyring,
    UnknownVersion,
    WrongPassphrase,
    decrypt_bytes,
    encrypt_bytes,
)

# The minimum argon2id cost keeps these tests fast; the default cost is libsodium's MODERATE.
FAST = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN, "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}


def _ids(ring: Keyring) -> list[str]:
    return [k.key_id for k in ring.keys]


def test_save_load_round_trip_with_mode_0600(tmp_path: Path) -> None:
    ring = Keyring.generate()
    ring.rotate()
    path = tmp_path / "org.key"
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Keyring.load(path)
    assert _ids(loaded) == _ids(ring)
    assert loaded.current.key_id == ring.current.key_id
    assert loaded.current.ed25519_seed == ring.current.ed25519_seed
    assert [p.name for p in tmp_path.iterdir()] == ["org.key"]  # no temp file left behind


def test_save_replaces_an_existing_file_and_keeps_0600(tmp_path: Path) -> None:
    path = tmp_path / "org.key"
    path.write_text("old")
    path.chmod(0o644)
    ring = Keyring.generate()
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.load(path).current.key_id == ring.current.key_id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o620])
def test_group_or_world_accessible_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "org.key"
    Keyring.generate().save(path)
    os.chmod(path, mode)
    with pytest.raises(InsecureKeyFile, match=f"{mode:04o}") as err:
        Keyring.load(path)
    assert "chmod 600" in str(err.value)


def test_missing_file_and_directory_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileMissing, match="does not exist"):
        Keyring.load(tmp_path / "nope.key")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(KeyFileMissing, match="not a regular file"):
        Keyring.load(tmp_path / "dir")


def test_passphrase_round_trip(tmp_path: Path) -> None:
    ring = Keyring.generate()
    path = tmp_path / "org.key"
    ring.save(path, "correct horse", **FAST)
    text = path.read_text()
    secret_b64 = __import__("base64").b64encode(ring.current.x25519_secret).decode()
    assert secret_b64 not in text
    doc = json.loads(text)
    assert doc["protection"] == "argon2id+secretbox" and "keys" not in doc
    assert Keyring.load(path, "correct horse").current.x25519_secret == ring.current.x25519_secret


def test_wrong_or_missing_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "org.key"
    Keyring.generate().save(path, "correct horse", **FAST)
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        Keyring.load(path, "battery staple")
    with pytest.raises(WrongPassphrase, match="no passphrase was given"):
        Keyring.load(path)


def test_empty_passphrase_is_refused_on_save(tmp_path: Path) -> None:
    with pytest.raises(WrongPassphrase, match="empty passphrase"):
        Keyring.generate().save(tmp_path / "org.key", "", **FAST)


def test_default_kdf_cost_is_recorded(tmp_path: Path) -> None:
    doc = Keyring.generate().to_document("pw", **FAST)
    assert doc["kdf"]["name"] == "argon2id13"
    from vfed.common.crypto import keyring as keyring_module

    assert keyring_module.DEFAULT_OPSLIMIT == nacl.pwhash.argon2id.OPSLIMIT_MODERATE
    assert keyring_module.DEFAULT_MEMLIMIT == nacl.pwhash.argon2id.MEMLIMIT_MODERATE


def _write_private(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("content", "error", "needle"),
    [
        (b"\xff\xfe garbage", CorruptKey, "not JSON"),
        ("[]", CorruptKey, "not a vfed keyring"),
        ('{"vfed_keyring": 9}', UnknownVersion, "version 9"),
        ('{"vfed_keyring": 1, "protection": "rot13"}', CorruptKey, "rot13"),
        ('{"vfed_keyring": 1, "protection": "none", "keys": []}', CorruptKey, "no keys"),
        ('{"vfed_keyring": 1, "protection": "none", "keys": [5]}', CorruptKey, "entry 0"),
        (
            '{"vfed_keyring": 1, "protection": "none", "keys": [{"x25519": "!!", "ed25519": "AA=="}]}',
            CorruptKey,
            "x25519",
        ),
        (
            '{"vfed_keyring": 1, "protection": "none", "keys": [{"x25519": "AAAA", "ed25519": "AAAA"}]}',
            CorruptKey,
            "32 bytes",
        ),
    ],
)
def test_corrupt_key_files(tmp_path: Path, content: str | bytes, error: type[Exception], needle: str) -> None:
    path = _write_private(tmp_path / "org.key", content)
    with pytest.raises(error, match=needle):
        Keyring.load(path)


def test_hostile_kdf_limits_are_refused_before_deriving(tmp_path: Path) -> None:
    doc = Keyring.generate().to_document("pw", **FAST)
    doc["kdf"]["memlimit"] = 1 << 40
    path = _write_private(tmp_path / "org.key", json.dumps(doc))
    with pytest.raises(CorruptKey, match="out of range"):
        Keyring.load(path, "pw")


def test_altered_protected_file_reads_as_wrong_passphrase(tmp_path: Path) -> None:
    doc = Keyring.generate().to_document("pw", **FAST)
    blob = bytearray(__import__("base64").b64decode(doc["ciphertext"]))
    blob[-1] ^= 1
    doc["ciphertext"] = __import__("base64").b64encode(bytes(blob)).decode()
    path = _write_private(tmp_path / "org.key", json.dumps(doc))
    with pytest.raises(WrongPassphrase):
        Keyring.load(path, "pw")


def test_rotation_keeps_old_results_decryptable(tmp_path: Path) -> None:
    """An old result sealed to the previous key still opens after rotating and reloading the file."""
    node, researcher = Keyring.generate(), Keyring.generate()
    old_key = node.current
    old_result = encrypt_bytes(b"result sealed to the old key", researcher.current, [old_key.public])

    new_key = node.rotate()
    assert node.current is new_key and new_key.key_id != old_key.key_id
    assert node.get(old_key.key_id) is old_key and node.get("0" * 32) is None
    path = tmp_path / "org.key"
    node.save(path, "pw", **FAST)
    reloaded = Keyring.load(path, "pw")

    assert decrypt_bytes(old_result, reloaded, researcher.current.public) == b"result sealed to the old key"
    new_result = encrypt_bytes(b"sealed to the new key", researcher.current, [reloaded.current.public])
    assert decrypt_bytes(new_result, reloaded, researcher.current.public) == b"sealed to the new key"
    # A keyring that never had the new key cannot read what was sealed to it.
    from vfed.common.crypto import NotARecipient

    with pytest.raises(NotARecipient):
        decrypt_bytes(new_result, Keyring([old_key]), researcher.current.public)


def test_sender_rotation_resolves_historical_keys_by_id() -> None:
    """Results signed by a sender's old key verify through a lookup that knows historical keys."""
    sender, recipient = Keyring.generate(), Keyring.generate()
    old = sender.current
    blob = encrypt_bytes(b"x", old, [recipient.current.public])
    sender.rotate()
    published = {k.key_id: k.public for k in sender.keys}
    assert decrypt_bytes(blob, recipient, published.get) == b"x"


def test_save_into_a_missing_folder_is_a_crypto_error(tmp_path: Path) -> None:
    from vfed.common.crypto import CryptoError

    with pytest.raises(CryptoError, match="cannot write key file"):
        Keyring.generate().save(tmp_path / "missing" / "org.key")
