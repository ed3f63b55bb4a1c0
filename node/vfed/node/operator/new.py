"""`vnode new`: write a node configuration, from questions or from flags, validated before it is saved."""

from __future__ import annotations

import os
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import click
import yaml

from vfed.node.config import DATASET_TYPES, RUNTIME_KINDS, ConfigError, parse_settings
from vfed.node.operator import keys
from vfed.node.operator.common import CONTEXT, BadInput, OperatorError, scope_option, to_scope
from vfed.node.operator.new_runtime import kubernetes_options, runtime_section
from vfed.node.operator.paths import NodeRef, check_name, interactive

_TYPES_BY_SUFFIX = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".sqlite": "sqlite",
    ".sqlite3": "sqlite",
    ".db": "sqlite",
}
_FILE_TYPES = ("csv", "parquet", "sqlite")
_SQL_SCHEMES = {"postgresql", "postgres", "mysql", "mariadb", "mssql", "oracle"}
"""URL schemes (before any `+driver`) taken as a `sql` dataset when no type is given."""
_TYPE_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PASSWORD = re.compile(r"(://[^:/@]*):[^@/]*@")
SERVER_CA_FILE = "server-ca.pem"

_HELP = """Create the configuration of node NAME (asks questions, or runs fully from flags).

\b
Examples:
  vnode new                                       # asks, with defaults
  vnode new hospital-a --server-url http://127.0.0.1:7600 --api-key 3.s3cr3t \\
      --dataset patients=/data/patients.csv --dataset visits=/data/visits.db:sqlite \\
      --allow-image 'vfed-examples/*' --allow-organization 2
  vnode new clinic --api-key 3.s3cr3t --dataset stays=postgresql://reader@db:5432/clinic \\
      --dataset-table stays=public.stays --dataset-password-file stays=/etc/vfed/db-reader.password

The node runs no image until one is allowed: each --allow-image (a glob over the image name, or an image
digest sha256:...) adds one to policies.allowed_images. --allow-organization limits the organizations whose
tasks it runs (beside the trust pins of `vnode trust`).
  vnode new lab --system --api-key 4.xyz --private-key /etc/vfed/keys/lab.key --force

Runs in a Kubernetes cluster (docs/deployment.md, "Kubernetes"); such a node starts with
`vnode start NAME --no-container`, or in the cluster from docker/kubernetes/node:
  vnode new site-k --runtime kubernetes --namespace vfed-site --kubeconfig ~/.kube/config \
      --proxy-service vfed-node-proxy --proxy-ip-block 192.0.2.10/32 --api-key 5.abc
"""


def parse_dataset(text: str) -> tuple[str, dict[str, str]]:
    """`LABEL=URI[:TYPE]` into (label, {uri, type}), or BadInput (one line, exit 2).

    TYPE is the word after the last colon; colons elsewhere belong to the URI (`postgresql://u@h:5432/x:sql`,
    `/data/a:b.csv`). Only the types the algorithm SDK reads are accepted (DATASET_TYPES). Without a type it
    comes from the file's suffix, or is `sql` for a database URL. File paths become absolute."""
    shown = _PASSWORD.sub(r"\1:***@", text)  # a database URL's password is never echoed
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise BadInput("--dataset", f"{shown!r}: expected LABEL=URI[:TYPE]")
    uri, kind = rest, ""
    head, colon, tail = rest.rpartition(":")
    # (a word after the colon is a type, unless the whole names an existing file and the word no known type)
    if (
        colon
        and head
        and _TYPE_WORD.match(tail)
        and (tail.lower() in DATASET_TYPES or not Path(rest).exists())
    ):
        uri, kind = head, tail.lower()
    if kind and kind not in DATASET_TYPES:
        raise BadInput(
            "--dataset",
            f"{shown!r}: type {kind!r} is not one the algorithm SDK reads; "
            f"accepted: {', '.join(DATASET_TYPES)}",
        )
    url = _URL.match(uri)
    scheme = url.group(1).lower() if url else None
    if scheme is None:
        uri = str(Path(uri).expanduser().resolve())
    path = Path(unquote(urlparse(uri).path)) if scheme == "file" else Path(uri) if scheme is None else None
    if not kind:
        kind = _infer_type(shown, scheme, path)
    if kind == "sql" and (scheme is None or scheme == "file"):
        raise BadInput("--dataset", f"{shown!r}: a sql dataset is a database URL (postgresql://user@host/db)")
    if kind in _FILE_TYPES and path is None:
        raise BadInput("--dataset", f"{shown!r}: a {kind} dataset is a file path, not a {scheme}:// URL")
    if kind in _FILE_TYPES and path is not None and path.is_dir():
        raise BadInput("--dataset", f"{shown!r}: {path} is a folder; a {kind} dataset is a file")
    return label, {"uri": uri, "type": kind}


SQL_KEYS = {
    "table": "--dataset-table",
    "query": "--dataset-query",
    "password_file": "--dataset-password-file",
}
"""A `sql` dataset's own keys, each given by its option as LABEL=VALUE."""


def sql_keys(given: dict[str, tuple[str, ...]], datasets: dict[str, dict[str, str]]) -> None:
    """Add each `--dataset-table|query|password-file LABEL=VALUE` to the `sql` dataset LABEL (BadInput for a
    label no --dataset names, or names twice); the settings model then checks the combination."""
    for key, values in given.items():
        option = SQL_KEYS[key]
        for text in values:
            label, sep, value = text.partition("=")
            if not sep or not label or not value.strip():
                raise BadInput(option, f"{text!r}: expected LABEL=VALUE")
            if label not in datasets:
                raise BadInput(option, f"{text!r}: no --dataset is labelled {label!r}")
            if key in datasets[label]:
                raise BadInput(option, f"{text!r}: dataset {label!r} has a {key} already")
            if key == "password_file":
                value = str(Path(value).expanduser().resolve())
            datasets[label][key] = value


def _infer_type(shown: str, scheme: str | None, path: Path | None) -> str:
    """The type a URI names by itself: a file's suffix, or `sql` for a database URL."""
    accepted = ", ".join(DATASET_TYPES)
    if path is None:
        if scheme is not None and scheme.split("+", 1)[0] in _SQL_SCHEMES:
            return "sql"
        raise BadInput(
            "--dataset",
            f"{shown!r}: cannot tell the type of a {scheme}:// URI: give a file path (csv, parquet, sqlite), "
            "or add :sql to a database URL",
        )
    if path.is_dir():
        raise BadInput(
            "--dataset",
            f"{shown!r}: {path} is a folder; the algorithm SDK reads files (csv, parquet, sqlite) "
            "or a database URL (sql)",
        )
    kind = _TYPES_BY_SUFFIX.get(path.suffix.lower())
    if kind is None:
        raise BadInput(
            "--dataset",
            f"{shown!r}: cannot tell the type from the name {path.name!r}; add :TYPE ({accepted})",
        )
    return kind


def check_images(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """An allowed image is a non-empty glob or a whole digest (a mistyped digest would allow nothing)."""
    del ctx, param
    for value in values:
        if not value.strip():
            raise click.BadParameter("an allowed image cannot be empty", param_hint="'--allow-image'")
        if value.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
            raise click.BadParameter(
                f"{value!r}: a digest is sha256: and 64 lowercase hex digits", param_hint="'--allow-image'"
            )
    return values


def build_config(
    ref: NodeRef,
    *,
    server_url: str,
    api_key: str,
    datasets: list[str],
    private_key: str | None,
    runtime: str,
    mqtt_url: str | None,
    runtime_options: dict[str, Any] | None = None,
    allow_images: list[str] | None = None,
    allow_organizations: list[int] | None = None,
    server_ca: str | None = None,
    sql: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """The YAML mapping for this node, checked against the agent's own settings model.

    Deny by default: `policies.allowed_images` is always written, empty unless images are allowed (a node
    without the key would run any image anyone names, and pull it from wherever its name points). So is
    `unchecked_outputs: refuse`: an output the node cannot check for disclosure is not released."""
    policies: dict[str, Any] = {"allowed_images": list(dict.fromkeys(allow_images or []))}
    if allow_organizations:
        policies["allowed_organizations"] = list(dict.fromkeys(allow_organizations))
    offered = dict(parse_dataset(d) for d in datasets)
    sql_keys(sql or {}, offered)
    policies["unchecked_outputs"] = "refuse"
    data: dict[str, Any] = {
        "name": ref.name,
        "server_url": server_url,
        "api_key": api_key,
        "data_dir": str(ref.data_dir),
        "private_key": str(Path(private_key).expanduser().resolve())
        if private_key
        else str(ref.data_dir / "org-key.json"),
        "datasets": offered,
        "runtime": runtime_section(runtime, runtime_options or {}),
        # Tasks run only for organizations pinned with `vnode trust` (and this node's own).
        "trust": "pinned",
        # A run reads a dataset only under a lease granted on the collaboration's ledger (`vnode leases`).
        "leases": "required",
        # Only the images (and organizations) named here; the runtime pulls nothing (pull_missing: false).
        "policies": policies,
    }
    if mqtt_url:
        data["mqtt_url"] = mqtt_url
    if server_ca:
        data["server_ca_file"] = server_ca
    try:
        parse_settings(data)
    except ConfigError as exc:
        raise OperatorError(f"the configuration would be invalid: {exc}") from None
    return data


def copy_server_ca(ref: NodeRef, source: Path) -> Path:
    """The server's CA, checked to be PEM certificates, copied into the node's folder (`server-ca.pem`,
    0644: not secret), so the config does not depend on where the operator downloaded it."""
    try:
        data = source.read_bytes()
        ssl.create_default_context(cadata=data.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError, ValueError):  # before OSError: SSLError is one
        raise OperatorError(f"--server-ca {source}: not a PEM certificate (the server's ca.crt)") from None
    except OSError as exc:
        raise OperatorError(f"--server-ca {source}: cannot read it: {exc.strerror or exc}") from None
    target = ref.data_dir / SERVER_CA_FILE
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    os.replace(tmp, target)
    return target


def write_config(path: Path, data: dict[str, Any]) -> None:
    """Write with mode 0600: the file holds the node's API key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".yaml.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(
            f"# vfed node {data['name']!r}: written by `vnode new`; `vnode files` shows the other files.\n"
        )
        yaml.safe_dump(data, fh, sort_keys=False)
    os.replace(tmp, path)


def _ask(value: str | None, question: str, default: str | None, required: str) -> str:
    if value:
        return value
    if interactive():
        return str(click.prompt(question, default=default))
    if default is not None:
        return default
    raise click.UsageError(f"{required} is required when not run interactively")


def _ask_datasets(given: tuple[str, ...]) -> list[str]:
    if given or not interactive():
        return list(given)
    found: list[str] = []
    while True:
        answer = str(
            click.prompt("Dataset as LABEL=URI[:TYPE] (empty to finish)", default="", show_default=False)
        )
        if not answer:
            return found
        try:
            parse_dataset(answer)
        except click.ClickException as exc:
            click.echo(exc.format_message(), err=True)
            continue
        found.append(answer)


@click.command("new", help=_HELP, context_settings=CONTEXT)
@click.argument("name", required=False)
@scope_option
@click.option("--server-url", help="The vfed server. [default: http://127.0.0.1:7600]")
@click.option("--api-key", help="The node's API key, '<key_id>.<secret>', as printed by the server.")
@click.option(
    "--dataset",
    "datasets",
    multiple=True,
    metavar="LABEL=URI[:TYPE]",
    help=f"A file path or database URL; TYPE: {', '.join(DATASET_TYPES)}, else from the suffix. Repeatable.",
)
@click.option(
    "--dataset-table",
    "dataset_tables",
    multiple=True,
    metavar="LABEL=TABLE",
    help="The table (or view, `schema.name`) a sql dataset extracts whole. Repeatable.",
)
@click.option(
    "--dataset-query",
    "dataset_queries",
    multiple=True,
    metavar="LABEL=SELECT",
    help="Instead of a table: the SELECT a sql dataset extracts. Repeatable.",
)
@click.option(
    "--dataset-password-file",
    "dataset_password_files",
    multiple=True,
    metavar="LABEL=PATH",
    help="The file holding a sql dataset's database password (never in the URL). Repeatable.",
)
@click.option("--private-key", type=click.Path(dir_okay=False), help="The organization's private key file.")
@click.option("--runtime", type=click.Choice(RUNTIME_KINDS), help="[default: docker]")
@kubernetes_options
@click.option("--mqtt-url", help="Doorbell broker, mqtt://host:port (optional: polling works without).")
@click.option(
    "--server-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The CA of an https:// server (`vserver tls init`'s ca.crt), copied into the node's folder; "
    "default: the system's CAs.",
)
@click.option(
    "--allow-image",
    "allow_images",
    multiple=True,
    metavar="GLOB|sha256:DIGEST",
    callback=check_images,
    help="An image this node may run (repeatable). None: it runs no image until its config lists one.",
)
@click.option(
    "--allow-organization",
    "allow_organizations",
    multiple=True,
    type=click.IntRange(min=1),
    metavar="ID",
    help="Run tasks only of these organizations (repeatable; their own and their researchers').",
)
@click.option("--generate-key/--no-generate-key", default=None, help="Create the key file when missing.")
@click.option("--force", is_flag=True, help="Overwrite an existing configuration of that name.")
def new_command(
    name: str | None,
    user_scope: bool,
    server_url: str | None,
    api_key: str | None,
    datasets: tuple[str, ...],
    dataset_tables: tuple[str, ...],
    dataset_queries: tuple[str, ...],
    dataset_password_files: tuple[str, ...],
    private_key: str | None,
    runtime: str | None,
    namespace: str | None,
    kubeconfig: Path | None,
    kube_context: str | None,
    proxy_service: str | None,
    proxy_port: int | None,
    proxy_listen: str | None,
    proxy_ip_blocks: tuple[str, ...],
    mqtt_url: str | None,
    server_ca: Path | None,
    allow_images: tuple[str, ...],
    allow_organizations: tuple[int, ...],
    generate_key: bool | None,
    force: bool,
) -> None:
    name = check_name(_ask(name, "Node name", "node", "NAME"))
    ref = NodeRef(name, to_scope(user_scope))
    if ref.config_path.exists() and not force:
        raise OperatorError(f"{ref.config_path} exists; add --force to overwrite it")
    ca_copy = copy_server_ca(ref, server_ca) if server_ca is not None else None
    data = build_config(
        ref,
        server_url=_ask(server_url, "Server URL", "http://127.0.0.1:7600", "--server-url"),
        api_key=_ask(api_key, "Node API key (<key_id>.<secret>)", None, "--api-key"),
        datasets=_ask_datasets(datasets),
        private_key=private_key
        or (
            click.prompt("Organization private key file", default=str(ref.data_dir / "org-key.json"))
            if interactive()
            else None
        ),
        runtime=runtime
        or (
            click.prompt("Runtime", type=click.Choice(RUNTIME_KINDS), default="docker")
            if interactive()
            else "docker"
        ),
        mqtt_url=mqtt_url,
        runtime_options={
            "namespace": namespace,
            "kubeconfig": kubeconfig,
            "kube_context": kube_context,
            "proxy_service": proxy_service,
            "proxy_port": proxy_port,
            "proxy_listen": proxy_listen,
            "proxy_ip_blocks": proxy_ip_blocks,
        },
        server_ca=str(ca_copy) if ca_copy is not None else None,
        allow_images=list(allow_images),
        allow_organizations=list(allow_organizations),
        sql={"table": dataset_tables, "query": dataset_queries, "password_file": dataset_password_files},
    )
    write_config(ref.config_path, data)
    click.echo(f"wrote {ref.config_path}")
    if not allow_images:
        click.echo(
            "no image allowed yet: the node refuses every run until policies.allowed_images lists one "
            "(`vnode new --force --allow-image ...`, or edit the file)"
        )
    key_path = Path(data["private_key"])
    if not key_path.exists():
        if generate_key is None:
            generate_key = (
                click.confirm(f"Generate an organization key at {key_path}?", default=True)
                if (interactive())
                else True
            )
        if generate_key:
            key_id = keys.generate_file(key_path, passphrase=None)
            click.echo(f"generated organization key {key_id} at {key_path} (mode 0600)")
    start = f"vnode start {name}{'' if user_scope else ' --system'}"
    if data["runtime"]["kind"] == "kubernetes":
        start += " --no-container"  # `vnode start` runs Docker-runtime agents in a container
    click.echo(f"next: `{start}`")
