"""Typed crypto errors: each says what failed, so no raw nacl or ValueError reaches a user."""

from __future__ import annotations


class CryptoError(Exception):
    """Base of every error raised by `vfed.common.crypto`; catch this at a CLI or API edge."""


class NotARecipient(CryptoError):
    """None of our keys is among the envelope's recipients."""


class UnknownSender(CryptoError):
    """The sender key id in the header does not resolve to a known public key."""


class BadSignature(CryptoError):
    """The sender's Ed25519 signature over header and chunk tags does not verify."""


class TamperedChunk(CryptoError):
    """A chunk failed authentication or its frame is malformed."""


class TrailingData(TamperedChunk):
    """Bytes follow the signature trailer; the envelope was extended."""


class TruncatedPayload(CryptoError):
    """The envelope ends before its final chunk and signature trailer."""


class ReorderedChunk(CryptoError):
    """A chunk arrived at a position other than its own index."""


class UnknownVersion(CryptoError):
    """The envelope or key file names a format version this code does not read."""


class CorruptHeader(CryptoError):
    """The envelope header is malformed (magic, cipher, lengths or sealed keys)."""


class ContextMismatch(CryptoError):
    """The envelope is bound to another context than the caller expects, or only one side names one."""


class UnsupportedCipher(CryptoError):
    """The envelope's cipher cannot run here (AES-256-GCM needs AES-NI in libsodium)."""


class CorruptKey(CryptoError):
    """A public key text or private key file does not parse or fails its checks."""


class WrongPassphrase(CryptoError):
    """The key file's passphrase is wrong (or missing for a protected file)."""


class InsecureKeyFile(CryptoError):
    """The private key file is readable or writable by group or others."""


class KeyFileMissing(CryptoError):
    """The private key file does not exist or cannot be read."""
