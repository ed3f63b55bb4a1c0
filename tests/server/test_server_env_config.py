"""Server settings from a file, the environment and flags (flags > environment > file), `*_file` secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfed.server.config import ConfigError, load_settings

VSERVER = [sys.executable, "-m", "vfed.server.cli", "--log-level", "WARNING"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("VFED_SERVER__")}
    return {**env, **extra}


def _vserver(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VSERVER, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_environment_sets_nested_keys_and_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VFED_SERVER__DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VFED_SERVER__MQTT__QUEUE_MAX", "7")
    monkeypatch.setenv("VFED_SERVER__LIMITS__HEAD_TIMEOUT_S", "2.5")
    monkeypatch.setenv("VFED_SERVER__TRUSTED_PROXIES", '["10.1.0.0/16", "192.0.2.7/32"]')
    monkeypatch.setenv("vfed_server__login__throttle_after", "9")  # names match without regard to case
    settings = load_settings(None)
    assert settings.data_dir == tmp_path
    assert settings.mqtt.queue_max == 7 and settings.limits.head_timeout_s == 2.5
    assert [str(n) for n in settings.trusted_proxies] == ["10.1.0.0/16", "192.0.2.7/32"]
    assert settings.login.throttle_after == 9


def test_flags_beat_environment_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "vserver.yaml"
    config.write_text("port: 1001\nhost: 127.0.0.2\nmqtt: {url: 'mqtt://broker:1883', queue_max: 5}\n")
    assert load_settings(config).port == 1001
    monkeypatch.setenv("VFED_SERVER__PORT", "1002")
    monkeypatch.setenv("VFED_SERVER__MQTT__QUEUE_MAX", "6")
    settings = load_settings(config)
    assert settings.port == 1002 and settings.host == "127.0.0.2"
    # a nested key from the environment leaves the file's other keys of that section in place
    assert settings.mqtt.queue_max == 6 and settings.mqtt.url == "mqtt://broker:1883"
    assert load_settings(config, port=1003).port == 1003


def test_secret_files_from_config_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "jwt").write_text("a-jwt-secret-from-a-file-of-its-own\n")
    (tmp_path / "env-jwt").write_text("another-jwt-secret-from-the-environment")
    (tmp_path / "mqtt").write_text("broker-password")
    (tmp_path / "db").write_text("p@ss/word")
    config = tmp_path / "vserver.yaml"
    config.write_text(
        f"jwt_secret_file: {tmp_path / 'jwt'}\n"
        "database_url: postgresql+asyncpg://vfed@db.example:5432/vfed\n"
        f"database_password_file: {tmp_path / 'db'}\n"
    )
    settings = load_settings(config)
    assert settings.jwt_secret == "a-jwt-secret-from-a-file-of-its-own"  # without the final newline
    assert settings.db_url() == "postgresql+asyncpg://vfed:p%40ss%2Fword@db.example:5432/vfed"
    monkeypatch.setenv("VFED_SERVER__JWT_SECRET_FILE", str(tmp_path / "env-jwt"))
    monkeypatch.setenv("VFED_SERVER__MQTT__PASSWORD_FILE", str(tmp_path / "mqtt"))
    settings = load_settings(config)
    assert settings.jwt_secret == "another-jwt-secret-from-the-environment"
    assert settings.mqtt.password == "broker-password"
    shown = repr(settings)  # secrets stay out of reprs (a log line, a traceback's locals)
    assert "another-jwt" not in shown and "broker-password" not in shown and "p@ss" not in shown


def test_secret_and_its_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "jwt").write_text("a-jwt-secret-from-a-file-of-its-own")
    config = tmp_path / "vserver.yaml"
    config.write_text(f"jwt_secret: inline-secret-long-enough\njwt_secret_file: {tmp_path / 'jwt'}\n")
    with pytest.raises(ConfigError, match="set jwt_secret or jwt_secret_file, not both"):
        load_settings(config)


def test_password_in_url_and_password_file_are_refused(tmp_path: Path) -> None:
    (tmp_path / "db").write_text("pw")
    config = tmp_path / "vserver.yaml"
    config.write_text(
        f"database_url: postgresql+asyncpg://u:inline@h/db\ndatabase_password_file: {tmp_path / 'db'}\n"
    )
    with pytest.raises(ConfigError, match="database_password"):
        load_settings(config)


@pytest.mark.parametrize(
    ("variables", "needle"),
    [
        (
            {"VFED_SERVER__JWT_SECRET_FILE": "/nonexistent/jwt"},
            "VFED_SERVER__JWT_SECRET_FILE /nonexistent/jwt: cannot read",
        ),
        ({"VFED_SERVER__PORT": "seventy"}, "VFED_SERVER__PORT: Input should be a valid integer"),
        ({"VFED_SERVER__COLOUR": "blue"}, "VFED_SERVER__COLOUR: 'colour' is not a setting"),
        ({"VFED_SERVER__MQTT__COLOUR": "blue"}, "VFED_SERVER__MQTT__COLOUR: Extra inputs are not permitted"),
        ({"VFED_SERVER__TRUSTED_PROXIES": "[not json"}, "VFED_SERVER__TRUSTED_PROXIES"),
    ],
)
def test_bad_environment_is_one_line_naming_the_variable(
    tmp_path: Path, variables: dict[str, str], needle: str
) -> None:
    result = _vserver("db", "upgrade", "--data-dir", str(tmp_path), env=_clean_env(**variables))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "vserver.sqlite").exists()


def test_missing_secret_file_in_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "vserver.yaml"
    config.write_text(f"data_dir: {tmp_path}\nmqtt: {{password_file: {tmp_path / 'absent'}}}\n")
    result = _vserver("db", "upgrade", "--config", str(config), env=_clean_env())
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"mqtt.password_file {tmp_path / 'absent'}: cannot read" in lines[0]


def test_environment_configures_a_real_command(tmp_path: Path) -> None:
    data = tmp_path / "from-env"
    result = _vserver("db", "upgrade", env=_clean_env(VFED_SERVER__DATA_DIR=str(data)))
    assert result.returncode == 0, result.stderr
    assert (data / "vserver.sqlite").is_file()
