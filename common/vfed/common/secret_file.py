"""Secrets handed over as files (a metrics bearer token, a key passphrase), and bearer tokens compared in
constant time.

A file, not an environment variable or an inline config value: a process's environment is shown by
`docker inspect` (for a container's) and by /proc/<pid>/environ, and config files get copied around. A file
can be mode 0600, mounted read-only, and kept on a tmpfs.
"""

from __future__ import annotations

import hmac
from pathlib import Path


class SecretFileError(Exception):
    """The secret file cannot be used; the message names the file and the problem."""


def read_secret_file(path: Path, what: str, *, min_length: int = 1) -> str:
    """The file's text without its trailing line break (an editor's final newline is not in the secret)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecretFileError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SecretFileError(f"{what} {path}: not UTF-8 text") from None
    value = text.rstrip("\r\n")
    if len(value) < min_length:
        raise SecretFileError(f"{what} {path}: must hold at least {min_length} characters")
    return value


def bearer_matches(authorization: str | None, token: str) -> bool:
    """True when an `Authorization: Bearer <token>` header carries exactly this token."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
