"""Where `vfed` keeps its files, all in one config folder (VFED_CONFIG_DIR overrides it): the server URL,
tokens and key file of `vfed login` (one 0600 JSON file per user), your own key and the trust store."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from platformdirs import user_config_dir


def config_dir() -> Path:
    return Path(os.environ.get("VFED_CONFIG_DIR") or user_config_dir("vfed"))


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


def default_key_file() -> Path:
    """Where `vfed keys generate` puts the researcher's own keyring."""
    return config_dir() / "researcher-key.json"


def default_trust_file() -> Path:
    """The pins of organizations (VFED_TRUST_FILE, else `trusted_orgs` in the config folder)."""
    return Path(os.environ.get("VFED_TRUST_FILE") or config_dir() / "trusted_orgs")


def load() -> dict[str, Any]:
    path = credentials_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save(data: dict[str, Any]) -> Path:
    """Writes the file atomically (a 0600 temporary file in the same folder, then renamed over it): a reader
    in another process sees the old tokens or the new ones, never half a file."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def same_server(a: str | None, b: str | None) -> bool:
    """Whether two server URLs name the same server (a trailing slash and the scheme's case aside)."""
    return bool(a) and bool(b) and str(a).rstrip("/").lower() == str(b).rstrip("/").lower()


def update_tokens(
    url: str, username: str | None, old_refresh: str | None, access: str, refresh: str | None
) -> bool:
    """Stores tokens refreshed from the saved login of `username` at `url` (whose refresh token was
    `old_refresh`); leaves the file alone when it now holds another server's, another user's or a newer
    login. True when it stored them."""
    saved = load()
    if (
        not same_server(saved.get("url"), url)
        or saved.get("username") != username
        or saved.get("refresh_token") not in (old_refresh, refresh)
    ):
        return False
    saved.update(access_token=access, refresh_token=refresh)
    save(saved)
    return True
