"""Node configuration: one YAML file read into pydantic, so a bad key fails at start-up with its name."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vfed.common.api.doorbell import BrokerAddress
from vfed.common.env_config import (
    LayerError,
    env_name,
    from_environment,
    has_path,
    merge,
    resolve_secret_files,
)
from vfed.common.ledger.fabric_settings import FabricSettings
from vfed.common.netaddr import is_loopback_host
from vfed.node.runtime import registry

ENV_PREFIX = "VFED_NODE__"
_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ConfigError(Exception):
    """The configuration file cannot be used; the message names the key and the problem."""


class _Strict(BaseModel):
    # Attribute docstrings are the keys' descriptions: docs/vnode.md's reference is generated from them.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


RUNTIME_KINDS = tuple(kind for kind, entry in registry.KINDS.items() if entry.offered)
"""The runtimes the agent runs algorithms on (`vnode new --runtime` offers exactly these); the registry may
know more, whose configuration is read but not yet offered."""
DATASET_TYPES = ("csv", "parquet", "sqlite", "sql")
"""The dataset types the algorithm SDK reads (vfed.algorithms.datasets.DatasetType; a test keeps them
equal)."""


SQL_SCHEMES = ("postgresql", "postgres")
"""The URL schemes (before any `+driver`) of the databases a `sql` dataset is extracted from."""


class DatasetConfig(_Strict):
    """A dataset the node offers to algorithms: a file mounted read-only, or a `sql` table or query the node
    extracts to a Parquet file in the run's folder before the container starts (docs/vnode.md "SQL
    datasets")."""

    uri: str
    """A file's absolute path (csv, parquet, sqlite; mounted read-only into the run's container), or for
    `sql` a PostgreSQL URL without a password (`postgresql://reader@db.example:5432/clinic`)."""
    type: str = "csv"
    """csv, parquet or sqlite (a file), or sql (a PostgreSQL table or query the node extracts before each
    run): `DATASET_<LABEL>_TYPE` in the container, where a sql dataset arrives as `parquet`."""
    table: str | None = None
    """`sql` only, instead of query: the table (or view) to extract whole, `name` or `schema.name`."""
    query: str | None = None
    """`sql` only, instead of table: one SELECT whose rows are extracted (run in a read-only transaction)."""
    password_file: Path | None = None
    """`sql` only: a file holding the database user's password, read at each extraction (a relative path is
    taken from the config's folder); unset: no password, or libpq's usual places (`~/.pgpass`)."""
    epsilon_budget: float | None = Field(default=None, gt=0)
    """The differential-privacy epsilon all runs together may spend on this dataset, charged before each run
    and never refunded; only images whose manifest declares an epsilon may read it (docs/algorithms.md
    "Privacy budget"). Unset: no budget."""
    min_rows: int | None = Field(default=None, ge=0)
    """This dataset's own `min_rows` instead of the node's (a run reading several datasets is held to the
    strictest of theirs)."""
    min_cell_count: int | None = Field(default=None, ge=0)
    """This dataset's own `min_cell_count` instead of the node's (the strictest applies, as above)."""
    max_glm_saturation: float | None = Field(default=None, gt=0, le=1)
    """This dataset's own `max_glm_saturation` instead of the node's (the strictest applies, as above)."""

    @field_validator("type")
    @classmethod
    def _readable_type(cls, value: str) -> str:
        if value not in DATASET_TYPES:
            accepted = ", ".join(DATASET_TYPES)
            raise ValueError(f"{value!r} is not a dataset type the algorithm SDK reads (one of: {accepted})")
        return value

    @field_validator("table", "query")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\x00" in value):
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _sql_keys(self) -> DatasetConfig:
        if self.type != "sql":
            given = [k for k in ("table", "query", "password_file") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for a sql dataset, not {self.type}")
            return self
        if (self.table is None) == (self.query is None):
            raise ValueError("a sql dataset names exactly one of table or query")
        _check_sql_url(self.uri)
        return self


def _check_sql_url(uri: str) -> None:
    """A PostgreSQL URL with no password in it: the URL is shown in logs and listings, the password is not."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(uri)
    except (ArgumentError, ValueError):
        raise ValueError("uri: not a database URL (postgresql://user@host:5432/database)") from None
    if url.drivername.split("+", 1)[0] not in SQL_SCHEMES:
        raise ValueError(
            f"uri: sql datasets are extracted from PostgreSQL (postgresql://...), not {url.drivername}"
        )
    if url.password is not None or "password" in url.query:
        raise ValueError("uri: holds a password; put it in password_file (the uri is shown in logs)")
    if not url.database:
        raise ValueError("uri: names no database (postgresql://user@host:5432/database)")


class ImagePolicy(_Strict):
    """One allowed image: a digest (`sha256:...`) or a glob over the image reference, optionally only for the
    tasks whose root initiator (the researcher's organization at the top of a subtask chain) is listed."""

    image: str
    """A glob over the image reference (`vfed-examples/*`) or an image digest (`sha256:<64 hex>`)."""
    max_run_time_s: float | None = Field(default=None, gt=0)
    """Seconds a run of this image may take, instead of the node's max_run_time_s."""
    organizations: list[int] | None = None
    """Root initiating organizations this image may run for; missing: any the other rules allow."""
    unchecked_outputs: Literal["allow", "refuse"] | None = None
    """`allow`: outputs of this image the node cannot check (not structured parts) are released from runs
    that read a dataset; `refuse`: such a run fails with `disclosure-refused: unchecked-output`. Missing:
    `policies.unchecked_outputs`."""

    def matches(self, reference: str, digest: str | None) -> bool:
        """True when the rule admits this image reference or digest."""
        if _DIGEST_RE.match(self.image):
            return digest == self.image or reference.endswith("@" + self.image)
        return fnmatch.fnmatchcase(reference, self.image)

    def matches_name(self, reference: str) -> bool:
        """True when the reference alone shows the rule admits it (no engine asked): a glob matching it, or
        the rule's digest named in it (`name@sha256:...`, or the image ID itself)."""
        if _DIGEST_RE.match(self.image):
            return reference == self.image or reference.endswith("@" + self.image)
        return fnmatch.fnmatchcase(reference, self.image)

    @property
    def by_digest(self) -> bool:
        return _DIGEST_RE.match(self.image) is not None

    def for_organization(self, organization: int | None) -> bool:
        return self.organizations is None or organization in self.organizations


class Policies(_Strict):
    """What this organization allows. A missing list means no restriction on that axis; an empty list allows
    nothing (what `vnode new` writes for images until `--allow-image` names some)."""

    allowed_images: list[ImagePolicy] | None = None
    """The images the node runs: each a glob, a digest or an `{image, max_run_time_s, organizations}` rule
    (keys below). Checked on the name before the engine is asked about the image. Unset: any image (warned
    about); `[]`: none."""
    allowed_organizations: list[int] | None = None
    """Organization ids whose tasks (every initiator in a subtask chain) the node runs; unset: any pinned
    one."""
    allowed_users: list[int] | None = None
    """User ids whose tasks the node runs (the root initiator's user, and any user an intermediate
    organization names); unset: any user."""
    unchecked_outputs: Literal["allow", "refuse"] = "refuse"
    """Whether an output the node cannot check for disclosure (plain JSON or Parquet instead of structured
    parts, docs/algorithms.md "Disclosure control") is released from a run that read a dataset, for images
    whose rule does not say (and every image when allowed_images is unset)."""

    @field_validator("allowed_images", mode="before")
    @classmethod
    def _strings_to_rules(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"image": v} if isinstance(v, str) else v for v in value]
        return value


class LedgerBackend(_Strict):
    """Which ledger keeps the collaboration's datasets, leases and receipts (docs/ledger.md)."""

    backend: Literal["embedded", "fabric"] = "embedded"
    """`embedded`: the server keeps it as a signed, hash-chained log; `fabric`: the collaboration's
    Hyperledger Fabric channel, reached with the settings under `fabric` (needs the `fabric` extra)."""
    fabric: FabricSettings | None = None
    """The channel, chaincode, connection profile and this organization's Fabric identity."""

    @model_validator(mode="after")
    def _fabric_named(self) -> LedgerBackend:
        if self.backend == "fabric" and self.fabric is None:
            raise ValueError("backend: fabric needs the fabric settings (connection_profile, channel, ...)")
        return self


class NodeSettings(_Strict):
    """Everything `vnode run` needs."""

    name: str = "node"
    """The node's name on this machine: it names the agent's algorithm containers (`vfed-<name>-run-<run>`)
    and job volumes (`vfed-<name>-<job>-tmp`)."""
    server_url: str = "http://127.0.0.1:7600"
    """The vfed server, `http://` or `https://`."""
    server_ca_file: Path | None = None
    """The CA that signed an https:// server's certificate (`vserver tls init`'s ca.crt; `vnode new
    --server-ca`); None: the system's CAs. The host name in server_url is always verified."""
    api_key: SecretStr
    """The node's API key, `<key_id>.<secret>`, as the server printed it when the node was created (or give
    `api_key_file`)."""
    private_key: Path | None = None
    """The organization's key file; unset: `<data_dir>/org-key.json`."""
    private_key_passphrase_env: str | None = None
    """The environment variable holding the key file's passphrase (`vnode keys generate --passphrase-env`)."""
    private_key_passphrase_file: Path | None = None
    """A file holding the key file's passphrase, instead of the variable (how `vnode start` hands it to the
    dockerized agent: a mounted file, never a container environment variable: `docker inspect` shows them)."""
    data_dir: Path
    """The agent's own folder: journal, runs, job folders, ledger copy (made private, 0700, at every
    start)."""
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict)
    """The datasets offered to algorithms, by label (a letter, then letters, digits or `_`)."""
    policies: Policies = Field(default_factory=Policies)
    """Which images, organizations and users the node runs tasks for (keys below)."""
    max_concurrent_runs: int = Field(default=4, ge=1, le=256)
    """Runs the agent executes at once; more wait their turn."""
    max_run_time_s: float = Field(default=3600.0, gt=0)
    """Seconds a run may take before it is killed (an image rule's own max_run_time_s wins)."""
    kill_grace_s: float = Field(default=5.0, ge=0)
    """Seconds between SIGTERM and SIGKILL when a run's container is stopped."""
    poll_interval_s: float = Field(default=10.0, gt=0)
    """Seconds between polls of the server for new runs (the doorbell wakes the agent sooner); doubled up to
    max(this, 15 s) while the server is unreachable."""
    startup_timeout_s: float = Field(default=30.0, ge=0)
    """Seconds the agent keeps trying to log in at start while the server is unreachable."""
    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    """Seconds between the agent's heartbeats, which keep the node online on the server."""
    server_retry_s: float = Field(default=600.0, ge=0)
    """Seconds a run's report to the server is retried while the server is unreachable; after that the run
    stays in the journal and a later poll takes it up again."""
    job_volume_retention_s: float = Field(default=0.0, ge=0)
    """Seconds a job's temporary volume is kept after its last run; 0: removed with the job's last run."""
    mqtt_url: str | None = None
    """The doorbell broker, `mqtt://`, `mqtts://` or `tcp://host:port`; unset: the one the server announces
    (`GET /doorbell`), else polling alone."""
    mqtt_ca_file: Path | None = None
    """The CA an mqtts:// broker's certificate is checked with; None: server_ca_file (a broker behind the
    same private CA as the server, what `vserver tls init` makes), else the system's CAs."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """The port of the agent's `GET /metrics` (Prometheus); 0: any free port; unset: no metrics endpoint."""
    metrics_host: str = "127.0.0.1"
    """Where the metrics endpoint listens; an address that is not loopback needs metrics_token_file."""
    metrics_token_file: Path | None = None
    """A file holding a bearer token `GET /metrics` then wants; required for a metrics_host that is not
    loopback."""
    min_rows: int = Field(default=10, ge=0)
    """The fewest records a federated function may compute over (`VFED_MIN_ROWS` for the algorithm SDK, which
    refuses smaller datasets and subsets); the node refuses an aggregate or model part over fewer."""
    min_cell_count: int = Field(default=5, ge=0)
    """The smallest count a released count table, histogram bin or named count may hold, unless 0
    (`VFED_MIN_CELL_COUNT` for the SDK); the node refuses an output with a count from 1 to this minus 1."""
    max_glm_saturation: float = Field(default=0.33, gt=0, le=1)
    """The most parameters per record a released model part may have (`VFED_MAX_GLM_SATURATION` for the
    SDK), as DataSHIELD's nfilter.glm; the node refuses a more saturated one."""
    max_structured_output_bytes: int = Field(default=16 * 1024**2, gt=0)
    """The largest output the node decodes to check its parts; a bigger one counts as unchecked."""
    max_output_bytes: int = Field(default=16 * 1024**3, gt=0)
    """The largest output file a run may leave; a larger one fails the run."""
    max_log_bytes: int = Field(default=64 * 1024, gt=0)
    """How much of a run's log (its tail) is kept, sealed and sent to the server."""
    share_logs_with_initiator: bool = False
    """Seal a run's log tail to the initiator too (the run's reply keys), not only to this organization:
    what an algorithm prints can hold this organization's data values, so it is an explicit opt-in."""
    proxy_max_request_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """The largest request body a run's proxy reads."""
    # per run, at its proxy (docs/security.md "Limits"): requests in flight (more: 429), bodies held at once
    # (the rest wait unread), body and head read times, and the blobs and bytes the run may upload
    proxy_max_concurrent_requests: int = Field(default=16, ge=1)
    """Requests of one run in flight at its proxy; more are answered 429."""
    proxy_max_concurrent_bodies: int = Field(default=2, ge=1)
    """Requests with a body one run's proxy processes at once; the rest wait unread."""
    proxy_head_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds within which a request's head must reach a run's proxy."""
    proxy_body_timeout_s: float = Field(default=60.0, gt=0)
    """Seconds within which a request's body must reach a run's proxy."""
    proxy_max_blob_uploads_per_run: int = Field(default=1000, ge=0)
    """Sealed subtask inputs one run may upload through its proxy; past it 429 `quota-exceeded`."""
    proxy_max_blob_bytes_per_run: int = Field(default=1024**3, ge=0)
    """Bytes of sealed subtask inputs one run may upload; past it 413 `quota-exceeded`."""
    runtime: registry.RuntimeSection = Field(default_factory=registry.default_config)
    """The runtime (`runtime.kind`) and that runtime's own keys (below, each marked with its kind)."""
    trust: Literal["pinned", "tofu"] = "pinned"
    """`pinned`: run only for organizations pinned in the trust store; `tofu`: pin at first sight."""
    trust_store: Path | None = None
    """The organizations pinned by fingerprint (`vnode trust` edits it); unset: `<data_dir>/trusted_orgs`."""
    descriptor_skew_s: float = Field(default=300.0, ge=0)
    """Clock skew allowed on descriptor, certificate and key times, in seconds."""
    key_grace_s: float = Field(default=7 * 86400.0, ge=0)
    """Seconds an organization's replaced key still counts (as signer, reply key, or this node's input
    key)."""
    max_subtasks_per_run: int = Field(default=100, ge=0)
    """Subtasks one run's proxy creates at most."""
    max_subtask_depth: int = Field(default=2, ge=0, le=16)
    """How deep subtasks may nest; a deeper descriptor is refused, and a run's proxy makes none deeper."""
    require_researcher_keys: bool = False
    """Refuse tasks signed with an organization key instead of a certified researcher key."""
    ledger: LedgerBackend = Field(default_factory=LedgerBackend)
    """Where the ledger is kept: the server (default) or a Fabric channel."""
    leases: Literal["required", "off"] = "off"
    """`required`: a run reads a dataset only under a lease on the collaboration's ledger (written by
    `vnode new`); `off` (older configs): no lease check, no receipts, and a warning at start."""

    @model_validator(mode="after")
    def _metrics_and_secrets(self) -> NodeSettings:
        open_metrics = self.metrics_port is not None and self.metrics_token_file is None
        if open_metrics and not is_loopback_host(self.metrics_host):
            raise ValueError(
                f"metrics_host {self.metrics_host} is not a loopback address: set metrics_token_file too, or "
                "anyone who reaches that address reads the node's metrics"
            )
        if self.private_key_passphrase_env is not None and self.private_key_passphrase_file is not None:
            raise ValueError("set private_key_passphrase_env or private_key_passphrase_file, not both")
        return self

    @field_validator("server_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str | None) -> str | None:
        if value is not None:
            BrokerAddress.parse(value)  # ValueError: must look like mqtt://host:port
        return value

    @field_validator("api_key")
    @classmethod
    def _api_key_shape(cls, value: SecretStr) -> SecretStr:
        if "." not in value.get_secret_value():
            raise ValueError("must be '<key_id>.<secret>' as printed when the node was created")
        return value

    @field_validator("datasets")
    @classmethod
    def _labels(cls, value: dict[str, DatasetConfig]) -> dict[str, DatasetConfig]:
        for label in value:
            if not _LABEL_RE.match(label):
                raise ValueError(f"dataset label {label!r} must be a letter then letters, digits or _")
        return value

    @property
    def key_path(self) -> Path:
        """Where the organization key lives: the configured path, else one inside data_dir."""
        return self.private_key if self.private_key is not None else self.data_dir / "org-key.json"

    @property
    def trust_store_path(self) -> Path:
        """The pins of other organizations (`vnode trust`): the configured file, else one inside data_dir."""
        return self.trust_store if self.trust_store is not None else self.data_dir / "trusted_orgs"


def _describe(error: ValidationError, env: dict[str, Any]) -> str:
    """One part per problem, naming the environment variable when the value came from there."""
    parts = []
    for item in error.errors():
        loc, message = _runtime_key(tuple(item["loc"]), item)
        key = env_name(ENV_PREFIX, loc) if has_path(env, loc) else ".".join(str(p) for p in loc)
        parts.append(f"{key or '(top level)'}: {message}")
    return "; ".join(parts)


def _runtime_key(loc: tuple[str | int, ...], item: Any) -> tuple[tuple[str | int, ...], str]:
    """An error's key as written in the file: pydantic puts the runtime's kind (the tag that chose its config
    model) after `runtime`, and reports an unknown kind at the section, not at its `kind`."""
    message = str(item["msg"])
    if loc[:1] != ("runtime",):
        return loc, message
    if item["type"] == "unknown_runtime":
        given = item["input"].get("kind") if isinstance(item["input"], dict) else None
        if given is None:
            return loc, "must be a mapping of the runtime's keys"
        return ("runtime", "kind"), f"unknown runtime {given!r} (known: {', '.join(registry.KINDS)})"
    if len(loc) > 1 and loc[1] in registry.KINDS:
        loc = (loc[0], *loc[2:])
    return loc, message


def parse_settings(
    data: Any, *, base_dir: Path | None = None, env: dict[str, Any] | None = None
) -> NodeSettings:
    """Validate an already-parsed mapping (with `env`, the environment's layer, over it); relative paths
    are taken from base_dir, `<secret>_file` keys read (`api_key_file`)."""
    if not isinstance(data, dict):
        raise ConfigError("(top level): the configuration must be a mapping of keys to values")
    try:
        data = resolve_secret_files(NodeSettings, data, lambda key: key, base_dir)
    except LayerError as exc:
        raise ConfigError(str(exc)) from None
    try:
        settings = NodeSettings.model_validate(merge(data, env or {}))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, env or {})) from None
    if base_dir is not None:
        updates: dict[str, Any] = {}
        if not settings.data_dir.is_absolute():
            updates["data_dir"] = base_dir / settings.data_dir
        if settings.private_key is not None and not settings.private_key.is_absolute():
            updates["private_key"] = base_dir / settings.private_key
        if settings.trust_store is not None and not settings.trust_store.is_absolute():
            updates["trust_store"] = base_dir / settings.trust_store
        for key in ("private_key_passphrase_file", "metrics_token_file", "server_ca_file", "mqtt_ca_file"):
            value = getattr(settings, key)
            if value is not None and not value.is_absolute():
                updates[key] = base_dir / value
        datasets = {
            label: dataset.model_copy(update={"password_file": base_dir / dataset.password_file})
            for label, dataset in settings.datasets.items()
            if dataset.password_file is not None and not dataset.password_file.is_absolute()
        }
        if datasets:
            updates["datasets"] = {**settings.datasets, **datasets}
        settings = settings.model_copy(update=updates)
    return settings


def environment_layer(base_dir: Path | None = None) -> dict[str, Any]:
    """What `VFED_NODE__<KEY>` variables set (`__` between nested keys, `<secret>_FILE` for secrets; a
    relative secret file is taken from base_dir, the config's folder, like every other relative path)."""
    try:
        raw = from_environment(NodeSettings, ENV_PREFIX)
        return resolve_secret_files(
            NodeSettings, raw, lambda k: env_name(ENV_PREFIX, tuple(k.split("."))), base_dir
        )
    except LayerError as exc:
        raise ConfigError(str(exc)) from None


def load_settings(path: Path | None, *, environment: bool = False) -> NodeSettings:
    """Read the YAML file at path, and with `environment` the `VFED_NODE__...` variables over it (what `vnode
    run` does; the operator's commands read the file only, as the agent they start does not share their
    environment); every failure is a ConfigError with one clear message."""
    if path is None:
        return parse_settings({}, env=environment_layer() if environment else {})
    base_dir = path.resolve().parent
    env = environment_layer(base_dir) if environment else {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}") from None
    return parse_settings(data, base_dir=base_dir, env=env)
