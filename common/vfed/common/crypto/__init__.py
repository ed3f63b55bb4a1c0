"""End-to-end encryption for vfed: organization keys, keyrings and the signed, chunked envelope v1.

The byte layout and the security trade-offs are documented in docs/crypto.md.
"""

from .api import (
    decrypt_bytes,
    decrypt_file,
    decrypt_fileobj,
    decrypt_stream,
    encrypt_bytes,
    encrypt_file,
    encrypt_fileobj,
    encrypt_stream,
)
from .engine import Decryptor, Encryptor, SenderLookup
from .errors import (
    BadSignature,
    ContextMismatch,
    CorruptHeader,
    CorruptKey,
    CryptoError,
    InsecureKeyFile,
    KeyFileMissing,
    NotARecipient,
    ReorderedChunk,
    TamperedChunk,
    TrailingData,
    TruncatedPayload,
    UnknownSender,
    UnknownVersion,
    UnsupportedCipher,
    WrongPassphrase,
)
from .format import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    Cipher,
    Header,
    aes_gcm_available,
    context_digest,
    default_cipher,
    header_size,
    read_header,
)
from .keyring import Keyring
from .keys import OrgKey, PublicKey

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "BadSignature",
    "Cipher",
    "ContextMismatch",
    "CorruptHeader",
    "CorruptKey",
    "CryptoError",
    "Decryptor",
    "Encryptor",
    "Header",
    "InsecureKeyFile",
    "KeyFileMissing",
    "Keyring",
    "NotARecipient",
    "OrgKey",
    "PublicKey",
    "ReorderedChunk",
    "SenderLookup",
    "TamperedChunk",
    "TrailingData",
    "TruncatedPayload",
    "UnknownSender",
    "UnknownVersion",
    "UnsupportedCipher",
    "WrongPassphrase",
    "aes_gcm_available",
    "context_digest",
    "decrypt_bytes",
    "decrypt_file",
    "decrypt_fileobj",
    "decrypt_stream",
    "default_cipher",
    "encrypt_bytes",
    "encrypt_file",
    "encrypt_fileobj",
    "encrypt_stream",
    "header_size",
    "read_header",
]
