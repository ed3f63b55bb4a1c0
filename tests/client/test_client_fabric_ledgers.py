"""Which collaborations' ledgers a researcher reads from Fabric: `fabric_ledgers=` or the YAML file
VFED_FABRIC_LEDGERS names (the client has no other configuration file); a bad file is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vfed.client.client import AsyncClient
from vfed.client.errors import LedgerUnavailable
from vfed.client.ledger import FABRIC_LEDGERS_ENV, fabric_ledgers_from_env
from vfed.common.ledger.fabric import FabricSettings


def settings(tmp_path: Path) -> dict[str, object]:
    return {
        "connection_profile": str(tmp_path / "connection.yaml"),
        "channel": "study-42",
        "msp_id": "Org1MSP",
        "certificate": str(tmp_path / "cert.pem"),
        "private_key": str(tmp_path / "key.pem"),
    }


def test_the_file_names_each_collaborations_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledgers.yaml"
    path.write_text(yaml.safe_dump({7: settings(tmp_path), "9": {**settings(tmp_path), "channel": "other"}}))
    monkeypatch.setenv(FABRIC_LEDGERS_ENV, str(path))
    found = fabric_ledgers_from_env()
    assert sorted(found) == [7, 9]
    assert found[7].channel == "study-42" and found[9].channel == "other"
    assert found[7].chaincode == "vfed-ledger"
    client = AsyncClient("http://127.0.0.1:9")
    assert client.fabric_ledgers == found
    explicit = AsyncClient(
        "http://127.0.0.1:9", fabric_ledgers={3: FabricSettings.model_validate(settings(tmp_path))}
    )
    assert list(explicit.fabric_ledgers) == [3]


def test_without_the_variable_every_ledger_is_the_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FABRIC_LEDGERS_ENV, raising=False)
    assert fabric_ledgers_from_env() == {}


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("- just\n- a list\n", "no mapping"),
        ("7: {channel: x}\n", "validation error"),
        ("nope: {}\n", "invalid literal"),
        ("{unclosed", "expected"),
    ],
)
def test_a_bad_file_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, why: str
) -> None:
    path = tmp_path / "ledgers.yaml"
    path.write_text(content)
    monkeypatch.setenv(FABRIC_LEDGERS_ENV, str(path))
    with pytest.raises(LedgerUnavailable, match=why) as caught:
        fabric_ledgers_from_env()
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    monkeypatch.setenv(FABRIC_LEDGERS_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(LedgerUnavailable, match="No such file"):
        fabric_ledgers_from_env()
