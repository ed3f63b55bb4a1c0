"""Where `vfed` keeps its files, all in one config folder (VFED_CONFIG_DIR overrides it): the server URL,
tokens and key file of `vfed login` (one 0600 JSON file per user), your own key and the trust store."""

from __future__ import annotations

import json
import os
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
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    os.chmod(path, 0o600)
    return path
