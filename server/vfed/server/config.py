"""Server settings: one pydantic model, loaded from YAML, so a bad key is named in the error."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import platformdirs
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_PORT = 7600


class ConfigError(Exception):
    """A config file that cannot be used; the message names the key and the problem."""


class MqttSettings(BaseModel):
    """Doorbell broker. `url` None means: `vserver start` runs an embedded broker on loopback."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(None, description="mqtt://host:port or mqtts://host:port")
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    embedded_broker: bool = Field(False, description="run an amqtt broker on loopback when url is unset")
    embedded_port: int = Field(1883, ge=1, le=65535)
    queue_max: int = Field(10_000, ge=1)
    reconnect_max_s: float = Field(30.0, gt=0)


class LoginSettings(BaseModel):
    """Password-guessing brakes: back off after a few failures, then lock the account for a while."""

    model_config = ConfigDict(extra="forbid")
    throttle_after: int = Field(3, ge=1)
    throttle_base_s: float = Field(1.0, ge=0)
    lockout_after: int = Field(10, ge=1)
    lockout_s: float = Field(900.0, ge=0)


class Settings(BaseModel):
    """Everything the server needs; defaults give a working single-machine server."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("vfed-server")))
    database_url: str | None = Field(None, description="SQLAlchemy async URL; default SQLite in data_dir")
    blob_dir: Path | None = Field(None, description="default: <data_dir>/blobs")
    max_blob_bytes: int = Field(2 * 1024**3, ge=1)
    jwt_secret: str = Field(default_factory=lambda: secrets.token_urlsafe(32), min_length=16)
    access_token_s: int = Field(3600, ge=1)
    refresh_token_s: int = Field(7 * 24 * 3600, ge=1)
    run_token_max_s: int = Field(7 * 24 * 3600, ge=1)
    online_window_s: int = Field(60, ge=1)
    run_log_max_bytes: int = Field(64 * 1024, ge=0)
    task_wait_max_s: float = Field(60.0, ge=1, le=3600, description="longest a task wait is held open")
    auto_migrate: bool = True
    login: LoginSettings = Field(default_factory=LoginSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)

    def db_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data folder."""
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'vserver.sqlite'}"

    def blob_path(self) -> Path:
        """Where blob files live."""
        return self.blob_dir or self.data_dir / "blobs"


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the dotted key."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{key}: {err['msg']}")
    return "; ".join(parts)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what and where."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(problem).split())


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Read YAML (if given), apply non-None overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        raw = loaded or {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(where + format_validation_error(exc)) from exc
