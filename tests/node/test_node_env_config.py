"""Node settings from the environment (`VFED_NODE__...`, over the file) and the API key from a file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfed.node.config import ConfigError, load_settings

BASE = "server_url: http://127.0.0.1:7600\napi_key: file.key\ndata_dir: data\nmax_concurrent_runs: 2\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, BASE + "policies: {allowed_organizations: [1]}\n")
    monkeypatch.setenv("VFED_NODE__MAX_CONCURRENT_RUNS", "3")
    monkeypatch.setenv("VFED_NODE__POLICIES__ALLOWED_IMAGES", '["vfed-test/*", {"image": "slow/*"}]')
    monkeypatch.setenv("VFED_NODE__RUNTIME__KIND", "docker")
    monkeypatch.setenv("VFED_NODE__RUNTIME__MEMORY_BYTES", "134217728")
    assert load_settings(config).max_concurrent_runs == 2  # the environment only when asked for
    settings = load_settings(config, environment=True)
    assert settings.max_concurrent_runs == 3
    assert [rule.image for rule in settings.policies.allowed_images or []] == ["vfed-test/*", "slow/*"]
    assert settings.policies.allowed_organizations == [1]  # the file's other policy keys stay
    assert (settings.runtime.kind, settings.runtime.memory_bytes) == ("docker", 128 * 1024 * 1024)


def test_api_key_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "key").write_text("key-id.from-a-file\n")
    config = write(tmp_path, "api_key_file: key\ndata_dir: data\n")  # relative to the config's folder
    assert load_settings(config).api_key.get_secret_value() == "key-id.from-a-file"
    (tmp_path / "env-key").write_text("key-id.from-the-environment")
    monkeypatch.setenv("VFED_NODE__API_KEY_FILE", str(tmp_path / "env-key"))
    settings = load_settings(write(tmp_path, BASE), environment=True)
    assert settings.api_key.get_secret_value() == "key-id.from-the-environment"


def test_environment_alone_is_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFED_NODE__API_KEY", "id.secret")
    monkeypatch.setenv("VFED_NODE__DATA_DIR", str(tmp_path / "data"))
    settings = load_settings(None, environment=True)
    assert settings.data_dir == tmp_path / "data" and settings.api_key.get_secret_value() == "id.secret"


@pytest.mark.parametrize(
    ("variables", "needle"),
    [
        (
            {"VFED_NODE__API_KEY_FILE": "/nonexistent/key"},
            "VFED_NODE__API_KEY_FILE /nonexistent/key: cannot read",
        ),
        ({"VFED_NODE__MAX_CONCURRENT_RUNS": "zero"}, "VFED_NODE__MAX_CONCURRENT_RUNS: Input should be"),
        ({"VFED_NODE__COLOUR": "blue"}, "VFED_NODE__COLOUR: 'colour' is not a setting"),
    ],
)
def test_vnode_run_with_bad_environment_is_one_line(
    tmp_path: Path, variables: dict[str, str], needle: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("VFED_NODE__")}
    config = write(tmp_path, BASE)
    result = subprocess.run(
        [str(Path(sys.executable).parent / "vnode"), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**env, **variables},
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_both_key_and_key_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("a.b")
    with pytest.raises(ConfigError, match="set api_key or api_key_file, not both"):
        load_settings(write(tmp_path, BASE + "api_key_file: key\n"))


def test_key_passphrase_file_from_the_environment_opens_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VFED_NODE__PRIVATE_KEY_PASSPHRASE_FILE (relative: from the config's folder) opens an encrypted key."""
    from vfed.common.crypto import CryptoError, Keyring
    from vfed.node.keys import load_or_create

    (tmp_path / "data").mkdir()
    original = Keyring.generate()
    original.save(tmp_path / "data" / "org-key.json", "right passphrase")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pass").write_text("right passphrase\n")
    (tmp_path / "secrets" / "wrong").write_text("wrong passphrase\n")
    config = write(tmp_path, BASE)
    monkeypatch.setenv("VFED_NODE__PRIVATE_KEY_PASSPHRASE_FILE", "secrets/pass")
    settings = load_settings(config, environment=True)
    assert settings.private_key_passphrase_file == tmp_path / "secrets" / "pass"
    keyring, created = load_or_create(settings)
    assert not created and keyring.current.key_id == original.current.key_id
    monkeypatch.setenv("VFED_NODE__PRIVATE_KEY_PASSPHRASE_FILE", "secrets/wrong")
    with pytest.raises(CryptoError):
        load_or_create(load_settings(config, environment=True))
