"""Server settings: one pydantic model, loaded from YAML, so a bad key is named in the error."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import platformdirs
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from vfed.common.env_config import (
    SECRET,
    LayerError,
    env_name,
    from_environment,
    has_path,
    merge,
    resolve_secret_files,
)
from vfed.common.netaddr import is_loopback_host

DEFAULT_PORT = 7600
DEFAULT_METRICS_PORT = 7601
ENV_PREFIX = "VFED_SERVER__"


class ConfigError(Exception):
    """A config file that cannot be used; the message names the key and the problem."""


class MqttSettings(BaseModel):
    """Doorbell broker. `url` None means: `vserver start` runs an embedded broker on loopback."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(None, description="mqtt://host:port or mqtts://host:port")
    username: str | None = None
    password: str | None = Field(None, json_schema_extra=SECRET, repr=False, description="or password_file")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    password_file: Path | None = Field(
        None,
        description="the server's broker password, from a file; `load_settings` reads it into `password`",
    )
    public_url: str | None = Field(
        None,
        description="the broker URL nodes are told (GET /doorbell); unset: `url`, never to a node on another "
        "machine when it is a loopback address",
    )
    broker_dir: Path | None = Field(
        None,
        description="folder of the Mosquitto password and ACL files the server keeps current (`vserver "
        "broker config` writes them); unset with `url` set: the server manages no broker accounts",
    )
    broker_pid_file: Path | None = Field(None, description="Mosquitto's pid file: SIGHUP after each rewrite")
    embedded_broker: bool = Field(False, description="run an amqtt broker on loopback when url is unset")
    embedded_port: int = Field(1883, ge=1, le=65535)
    queue_max: int = Field(
        10_000,
        ge=1,
        description="doorbell messages queued at most; beyond, a node's messages become one `poll` for it",
    )
    reconnect_max_s: float = Field(30.0, gt=0)
    spread_min_nodes: int = Field(
        50, ge=1, description="a task ringing at least this many nodes asks them to spread their claims"
    )
    spread_per_node_s: float = Field(
        0.005, ge=0, description="the spread asked for (`spread_s` in run-created doorbells) per node rung"
    )
    spread_max_s: float = Field(
        5.0, ge=0, le=10, description="the largest spread asked for (nodes cap it at 10 s whatever it says)"
    )


class LoginSettings(BaseModel):
    """Password-guessing brakes: growing delays, never a lockout (a lockout lets anyone lock root out).

    Failures count per client address and per account *at* an address, so an attacker slows down only
    himself: the right password from another address still works. Node logins count per API-key id.
    """

    model_config = ConfigDict(extra="forbid")
    throttle_after: int = Field(3, ge=1, description="failures of one account from one address before delays")
    address_throttle_after: int = Field(20, ge=1, description="failures from one address, any accounts")
    node_throttle_after: int = Field(5, ge=1, description="failures of one node API-key id")
    throttle_base_s: float = Field(1.0, ge=0, description="the first delay; each further failure doubles it")
    throttle_max_s: float = Field(900.0, ge=0, description="the longest delay")
    throttle_forget_s: float = Field(3600.0, gt=0, description="failures older than this are forgotten")

    @model_validator(mode="before")
    @classmethod
    def _no_lockout(cls, data: Any) -> Any:
        """The lockout keys of earlier versions are refused with the reason, not as mere unknown keys."""
        if isinstance(data, dict):
            for key in ("lockout_after", "lockout_s"):
                if key in data:
                    raise ValueError(
                        f"{key} is gone: logins are slowed down, never locked (a lockout let anyone lock "
                        "root out); remove it (see throttle_* and docs/security.md)"
                    )
        return data


class MetricsSettings(BaseModel):
    """Where `GET /metrics` is served: on a listener of its own (loopback, no token), and on the API port only
    with a bearer token.

    Metrics name routes, run counts and traffic: not secret data, but not for everyone who can reach the API.
    A loopback listener needs no secret to distribute and cannot be reached from another machine; a scraper
    elsewhere gets the token (or a listener on a monitoring network, which then needs the token too).
    """

    model_config = ConfigDict(extra="forbid")
    host: str = Field("127.0.0.1", description="the metrics listener's address; not loopback: token required")
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=f"the metrics listener's port (0: any free one); `vserver start` uses "
        f"{DEFAULT_METRICS_PORT} unless the config sets it (null: no listener)",
    )
    token_file: Path | None = Field(
        None,
        description="a file holding the bearer token (at least 16 characters): `/metrics` on the API port "
        "answers with `Authorization: Bearer <token>`, and so does the metrics listener",
    )

    @model_validator(mode="after")
    def _loopback_or_token(self) -> MetricsSettings:
        if self.port is not None and self.token_file is None and not is_loopback_host(self.host):
            raise ValueError(
                f"metrics.host {self.host} is not a loopback address: set metrics.token_file too, or anyone "
                "who reaches that address reads the metrics"
            )
        return self


class LimitsSettings(BaseModel):
    """What one client or organization may take of the server (docs/security.md "Limits").

    Blob quotas count an organization's stored blobs (uploads in progress included) and answer 413/429 with a
    JSON reason past them; the collector removes blobs no run references once they are `blob_keep_s` old
    (uploads are referenced by the task or result that follows them, so they get that long to be used).
    """

    model_config = ConfigDict(extra="forbid")
    blob_quota_bytes: int = Field(100 * 1024**3, ge=0, description="blob bytes one organization may store")
    blob_quota_count: int = Field(1_000_000, ge=0, description="blobs one organization may store")
    blob_keep_s: float = Field(24 * 3600.0, ge=0, description="unreferenced blobs are kept this long")
    blob_collect_interval_s: float = Field(600.0, gt=0, description="how often the collector runs")
    upload_expiry_s: float = Field(
        24 * 3600.0,
        gt=0,
        description="a resumable upload that got no bytes for this long is removed with what it stored",
    )
    head_timeout_s: float = Field(10.0, gt=0, description="a request's head must arrive within this")
    body_timeout_s: float = Field(60.0, gt=0, description="longest wait for the next bytes of a body")
    keepalive_timeout_s: float = Field(75.0, gt=0, description="idle keep-alive connections close after")


S3_MIN_PART_BYTES = 5 * 1024**2  # S3's smallest part (all but the last)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3Settings(BaseModel):
    """An S3-compatible bucket for blobs (AWS S3, MinIO, Ceph RGW; docs/deployment.md "S3 blob store").

    Credentials: access_key_id and secret_access_key here (each also as `<key>_file`), else the standard
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN variables of the server's environment.
    """

    model_config = ConfigDict(extra="forbid")
    endpoint: str = Field(
        description="https://host[:port] of the S3 API (http:// only on loopback or with allow_http)"
    )
    bucket: str = Field(description="an existing bucket; the server does not create it")
    region: str = Field("us-east-1", min_length=1, description="the bucket's region (signatures name it)")
    prefix: str = Field(
        "",
        description="key prefix of the blobs, e.g. `vfed/`: several servers or "
        "installations may share a bucket under different prefixes",
    )
    addressing: Literal["auto", "path", "virtual"] = Field(
        "auto",
        description="`path` (host/bucket/key: MinIO, Ceph RGW), `virtual` (bucket.host/key), `auto`: "
        "virtual for AWS endpoints, path for any other",
    )
    access_key_id: str | None = Field(None, json_schema_extra=SECRET, repr=False)
    secret_access_key: str | None = Field(None, json_schema_extra=SECRET, repr=False)
    session_token: str | None = Field(None, json_schema_extra=SECRET, repr=False)
    part_bytes: int = Field(
        8 * 1024**2,
        ge=S3_MIN_PART_BYTES,
        le=5 * 1024**3,
        description="multipart upload part size: the memory one upload holds (two parts while one is sent)",
    )
    allow_http: bool = Field(False, description="plain http:// to a host that is not loopback")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{value!r} is not an http(s)://host[:port] URL")
        if url.path.strip("/") or url.query or url.fragment or url.username:
            raise ValueError(f"{value!r}: give only scheme, host and port (the bucket is its own key)")
        try:
            url.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            raise ValueError(f"{value!r}: the port is not a number") from None
        return value

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not _BUCKET.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not an S3 bucket name (3-63 of a-z, 0-9, `.` and `-`)")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value.startswith("/") or "//" in value:
            raise ValueError(f"{value!r}: a key prefix neither starts with `/` nor holds `//`")
        return value

    @model_validator(mode="after")
    def _plain_http(self) -> S3Settings:
        url = urlsplit(self.endpoint)
        if url.scheme == "http" and not self.allow_http and not is_loopback_host(url.hostname or ""):
            raise ValueError(
                f"endpoint {self.endpoint} is plain HTTP to another machine: use https, or set "
                "allow_http: true for a private network you trust"
            )
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key go together (or both from the environment)")
        return self


class BlobsSettings(BaseModel):
    """Where blobs past the row limit are stored: files in `blob_dir` on this machine, or an S3 bucket that
    several server machines share."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["filesystem", "s3"] = "filesystem"
    s3: S3Settings | None = None

    @model_validator(mode="after")
    def _s3_with_backend(self) -> BlobsSettings:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend s3 needs the s3 section (endpoint and bucket at least)")
        if self.backend != "s3" and self.s3 is not None:
            raise ValueError("an s3 section is set but backend is filesystem: set backend: s3, or drop it")
        return self


class TlsSettings(BaseModel):
    """HTTPS for `vserver start` (docs/deployment.md "HTTPS"): the server's own certificate and key, or a
    reverse proxy in `trusted_proxies` that terminates TLS. The files are read again on SIGHUP."""

    model_config = ConfigDict(extra="forbid")
    cert_file: Path | None = Field(None, description="PEM certificate (chain) served; with key_file")
    key_file: Path | None = Field(None, description="PEM private key of cert_file, unencrypted (mode 0600)")
    terminated_by: Literal["server", "proxy"] = Field(
        "server",
        description="`proxy`: a reverse proxy listed in trusted_proxies terminates TLS; the server then "
        "serves plain HTTP to those proxies only",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if self.terminated_by == "proxy" and self.cert_file is not None:
            raise ValueError("with terminated_by: proxy, the proxy holds the certificate: drop cert_file")
        return self


class Settings(BaseModel):
    """Everything the server needs; defaults give a working single-machine server."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("vfed-server")))
    database_url: str | None = Field(None, description="SQLAlchemy async URL; default SQLite in data_dir")
    database_password: str | None = Field(
        None,
        json_schema_extra=SECRET,
        repr=False,
        description="the password for database_url, kept out of it (usually database_password_file)",
    )
    blob_dir: Path | None = Field(None, description="default: <data_dir>/blobs")
    max_blob_bytes: int = Field(16 * 1024**3, ge=1)
    blobs: BlobsSettings = Field(default_factory=BlobsSettings)
    jwt_secret: str = Field(
        default_factory=lambda: secrets.token_urlsafe(32), min_length=16, json_schema_extra=SECRET, repr=False
    )
    access_token_s: int = Field(3600, ge=1)
    refresh_token_s: int = Field(7 * 24 * 3600, ge=1)
    run_token_max_s: int = Field(7 * 24 * 3600, ge=1)
    online_window_s: int = Field(60, ge=1)
    run_log_max_bytes: int = Field(64 * 1024, ge=0)
    task_wait_max_s: float = Field(60.0, ge=1, le=3600, description="longest a task wait is held open")
    task_wait_recheck_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="a task wait re-reads the database this often besides being woken by a change (a safety "
        "net: changes wake waiters in every server process, on PostgreSQL through LISTEN/NOTIFY)",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes sharing the port (SO_REUSEPORT); more than 1 needs PostgreSQL",
    )
    auto_migrate: bool = Field(
        False,
        description="migrate an older schema at start, as `vserver start --upgrade` does; an empty database "
        "always gets the newest schema",
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="reverse proxies (CIDR) whose X-Forwarded-For is believed; from any other peer the "
        "header is ignored and the peer address is the client address",
    )
    login: LoginSettings = Field(default_factory=LoginSettings)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @model_validator(mode="after")
    def _proxy_is_trusted(self) -> Settings:
        if self.tls.terminated_by == "proxy" and not self.trusted_proxies:
            raise ValueError(
                "tls.terminated_by: proxy needs the proxy's addresses in trusted_proxies (only they may "
                "send requests, and only their X-Forwarded-For is believed)"
            )
        return self

    @model_validator(mode="after")
    def _one_database_password(self) -> Settings:
        if self.database_password is None:
            return self
        if self.database_url is None:
            raise ValueError("database_password needs a database_url (the SQLite default has no password)")
        try:
            url = make_url(self.database_url)
        except ArgumentError:
            return self  # named when the engine is made (vfed.server.db.open_engine)
        if url.password is not None:
            raise ValueError("database_url holds a password and database_password is set too: keep one")
        return self

    def db_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data folder; database_password goes in here,
        so it never has to be written into the URL of a config file or variable."""
        if self.database_url is None:
            return f"sqlite+aiosqlite:///{self.data_dir / 'vserver.sqlite'}"
        if self.database_password is None:
            return self.database_url
        url = make_url(self.database_url).set(password=self.database_password)
        return url.render_as_string(hide_password=False)

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
    """Settings from three layers, each over the one before: the YAML file (if given), the environment
    (`VFED_SERVER__<KEY>`, `__` between nested keys), then non-None `overrides` (command-line flags).
    A secret key may come as `<key>_file` in the file or the environment (vfed.common.env_config)."""
    try:
        file_layer = _file_layer(path)
        env_layer = resolve_secret_files(Settings, from_environment(Settings, ENV_PREFIX), _env_key)
    except LayerError as exc:
        raise ConfigError(str(exc)) from None
    flags = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings.model_validate(merge(merge(file_layer, env_layer), flags))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, env_layer, flags)) from None


def _env_key(dotted: str) -> str:
    return env_name(ENV_PREFIX, tuple(dotted.split(".")))


def _file_layer(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return resolve_secret_files(Settings, loaded, lambda key: f"{path}: {key}")


def _describe(exc: ValidationError, path: Path | None, env: dict[str, Any], flags: dict[str, Any]) -> str:
    """One part per problem, each naming where the value came from: a flag's key, the environment variable,
    or the file and its dotted key."""
    parts = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if has_path(flags, loc):
            parts.append(f"{key}: {err['msg']}")
        elif has_path(env, loc):
            parts.append(f"{env_name(ENV_PREFIX, loc)}: {err['msg']}")
        else:
            parts.append((f"{path}: " if path else "") + f"{key}: {err['msg']}")
    return "; ".join(parts)
