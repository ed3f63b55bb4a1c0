"""`vnode new`'s runtime options: the `runtime` section of a new node's configuration.

Docker needs none. Kubernetes needs where its runs go (namespace, a kubeconfig or the agent's in-cluster
account) and how they reach the node's proxy (the Service, and where the agent's listener binds). An option
of the other runtime is a usage error, not silently dropped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from vfed.node.operator.common import BadInput

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_PROXY_SERVICE = "vfed-node-proxy"
"""The proxy Service of docker/kubernetes/node (service.yaml)."""

KUBERNETES_OPTIONS = {
    "namespace": "--namespace",
    "kubeconfig": "--kubeconfig",
    "kube_context": "--kube-context",
    "proxy_service": "--proxy-service",
    "proxy_port": "--proxy-port",
    "proxy_listen": "--proxy-listen",
    "proxy_ip_blocks": "--proxy-ip-block",
}
"""The Kubernetes runtime's options, by parameter name."""


def kubernetes_options(func: F) -> F:
    """The options of `--runtime kubernetes` (docs/vnode.md, docs/deployment.md "Kubernetes")."""
    options = [
        click.option("--namespace", help="kubernetes: namespace of the runs' Jobs. [default: vfed]"),
        click.option(
            "--kubeconfig",
            type=click.Path(dir_okay=False, path_type=Path),
            help="kubernetes: kubeconfig of the cluster; without it, the agent's in-cluster service account.",
        ),
        click.option(
            "--kube-context", help="kubernetes: the kubeconfig's context. [default: its current one]"
        ),
        click.option(
            "--proxy-service",
            help=f"kubernetes: the Service runs reach the proxy by. [default: {DEFAULT_PROXY_SERVICE}]",
        ),
        click.option(
            "--proxy-port",
            type=click.IntRange(1, 65535),
            help="kubernetes: the proxy Service's port. [default: 8080]",
        ),
        click.option(
            "--proxy-listen",
            metavar="HOST[:PORT]",
            help="kubernetes: where the agent's proxy listener binds (each request needs its run's token). "
            "[default: 0.0.0.0, port --proxy-port]",
        ),
        click.option(
            "--proxy-ip-block",
            "proxy_ip_blocks",
            multiple=True,
            metavar="CIDR",
            help="kubernetes: an agent outside the cluster: its address, which runs' NetworkPolicy opens "
            "(repeatable).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def runtime_section(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """The `runtime` mapping for `kind` from the options given (None or empty: not given); BadInput (exit 2)
    for an option of another runtime or a value that cannot work."""
    used = [KUBERNETES_OPTIONS[k] for k, v in given.items() if v not in (None, (), "")]
    if kind != "kubernetes":
        if used:
            raise BadInput(used[0], f"is an option of --runtime kubernetes, not of {kind}")
        return {"kind": kind}
    section: dict[str, Any] = {"kind": "kubernetes"}
    if given.get("namespace"):
        section["namespace"] = given["namespace"]
    if given.get("kubeconfig") is not None:
        path = Path(given["kubeconfig"]).expanduser().resolve()
        if not path.is_file():
            raise BadInput("--kubeconfig", f"{path} is not a file")
        section["kubeconfig"] = str(path)
    if given.get("kube_context"):
        section["context"] = given["kube_context"]
    section["proxy_service"] = given.get("proxy_service") or DEFAULT_PROXY_SERVICE
    if given.get("proxy_port") is not None:
        section["proxy_port"] = given["proxy_port"]
    if given.get("proxy_listen"):
        section.update(_listen(given["proxy_listen"]))
    blocks = list(given.get("proxy_ip_blocks") or ())
    for block in blocks:
        try:
            ipaddress.ip_network(block)
        except ValueError:
            raise BadInput("--proxy-ip-block", f"{block!r} is not a CIDR (e.g. 192.0.2.10/32)") from None
    if blocks:
        section["proxy_ip_blocks"] = blocks
    return section


def _listen(text: str) -> dict[str, Any]:
    """`HOST[:PORT]` (`[v6]:PORT` for an IPv6 address) as proxy_listen_host / proxy_listen_port."""
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise BadInput(
            "--proxy-listen", f"{text!r}: HOST is an IP address of this machine (0.0.0.0: all)"
        ) from None
    out: dict[str, Any] = {"proxy_listen_host": host}
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise BadInput("--proxy-listen", f"{text!r}: PORT is a number from 1 to 65535")
        out["proxy_listen_port"] = int(port)
    return out
