"""`vserver tls init`: a private CA and a server certificate for a quick start, and what to hand to nodes."""

from __future__ import annotations

from pathlib import Path

import click

from vfed.server.config import DEFAULT_PORT


@click.group("tls")
def tls() -> None:
    """HTTPS: certificates for `vserver start` (tls.cert_file, tls.key_file)."""


@tls.command("init")
@click.option("--config", "config", type=click.Path(path_type=Path), help="YAML config file")
@click.option("--data-dir", type=click.Path(path_type=Path), help="the server's data folder")
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    help="where to write ca.crt, ca.key, server.crt, server.key (default: <data dir>/tls)",
)
@click.option(
    "--hostname",
    "names",
    multiple=True,
    metavar="NAME|ADDRESS",
    help="a name or address nodes and researchers reach the server by (repeatable; default: this "
    "machine's name, localhost, 127.0.0.1)",
)
@click.option(
    "--days", type=click.IntRange(1, 3650), default=397, show_default=True, help="server cert validity"
)
@click.option("--force", is_flag=True, help="replace an existing server certificate (the CA is kept)")
def init(
    config: Path | None,
    data_dir: Path | None,
    folder: Path | None,
    names: tuple[str, ...],
    days: int,
    force: bool,
) -> None:
    """Write a private CA and a server certificate signed by it; print the config and what nodes need."""
    from vfed.server.cli import _fail, _settings
    from vfed.server.tls_init import TlsInitError, default_names
    from vfed.server.tls_init import init as write

    settings = _settings(config, data_dir=data_dir)
    target = (folder or settings.data_dir / "tls").resolve()
    try:
        done = write(target, list(names) or default_names(), days=days, force=force)
    except TlsInitError as exc:
        _fail(str(exc))
        return
    host = done.names[0]
    port = settings.port if settings.port != DEFAULT_PORT else DEFAULT_PORT
    url = f"https://{host if ':' not in host else f'[{host}]'}:{port}"
    ca_state = "new" if done.ca_created else "kept"
    click.echo(f"wrote in {done.folder}:")
    click.echo(
        f"  ca.crt      the private CA ({ca_state}): hand it to every node and researcher (not secret)"
    )
    click.echo("  ca.key      the CA's key (0600): keep it secret; it signs the next server certificate")
    click.echo(f"  server.crt  for {', '.join(done.names)}, valid until {done.not_after:%Y-%m-%d} UTC")
    click.echo("  server.key  its key (0600)")
    click.echo(f"CA fingerprint (SHA-256): {done.ca_fingerprint}")
    click.echo(
        "  (read it to each node's operator out of band: `openssl x509 -fingerprint -sha256 -in ca.crt`)"
    )
    click.echo("server config:")
    click.echo("  tls:")
    click.echo(f"    cert_file: {done.server_cert}")
    click.echo(f"    key_file: {done.server_key}")
    click.echo("nodes and researchers:")
    click.echo(f"  vnode new NAME --server-url {url} --server-ca ca.crt ...")
    click.echo(f"  vfed login --url {url} --ca-file ca.crt")
    click.echo("renew: `vserver tls init --force` with the same names, then `kill -HUP <vserver pid>`")
