"""The researcher client's files (trust store, key, credentials) go to each test's own folder, never the
developer's config: a pin made at first sight against one test's server would name another key in the next."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_client_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFED_CONFIG_DIR", str(tmp_path / "vfed-config"))
    monkeypatch.setenv("VFED_TRUST_FILE", str(tmp_path / "vfed-config" / "trusted_orgs"))
    monkeypatch.delenv("VFED_TRUST", raising=False)
    monkeypatch.delenv("VFED_KEY_FILE", raising=False)
    monkeypatch.delenv("VFED_TOKEN", raising=False)
