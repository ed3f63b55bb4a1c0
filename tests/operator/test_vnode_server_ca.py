"""`vnode new --server-ca`: the server's CA copied into the node's folder and named by the config; the
dockerized agent gets it mounted read-only and its config points there. No Docker or server needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.server.tls_server import tls_init
from vnode_testlib import Dirs, dirs, vnode

from vfed.node.config import load_settings
from vfed.node.operator import container
from vfed.node.operator.paths import NodeRef, Scope

__all__ = ["dirs"]


def test_new_copies_the_server_ca_and_the_agent_container_gets_it(dirs: Dirs, tmp_path: Path) -> None:
    certs = tls_init(tmp_path / "tls", "localhost")
    result = vnode(
        "new", "alpha", "--server-url", "https://localhost:7600", "--api-key", "7.s3cr3t",
        "--server-ca", str(certs.ca), "--no-generate-key",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ref = NodeRef("alpha", Scope.USER)
    settings = load_settings(ref.config_path)
    assert settings.server_ca_file == ref.data_dir / "server-ca.pem"
    assert settings.server_ca_file.read_bytes() == certs.ca.read_bytes()

    inside = container.agent_config(ref, settings, "/var/lib/docker/volumes/x/_data")
    assert inside["server_ca_file"] == container.SERVER_CA_IN_CONTAINER
    (mount,) = container.server_ca_mounts(settings)
    assert mount["Target"] == container.SERVER_CA_IN_CONTAINER and mount["ReadOnly"] is True
    assert mount["Source"] == str(settings.server_ca_file)
    assert yaml.safe_load(ref.config_path.read_text())["server_ca_file"] == str(settings.server_ca_file)


def test_new_refuses_a_server_ca_that_is_not_a_certificate(dirs: Dirs, tmp_path: Path) -> None:
    bogus = tmp_path / "ca.crt"
    bogus.write_text("not a certificate\n")
    result = vnode(
        "new", "beta", "--server-url", "https://localhost:7600", "--api-key", "7.s3cr3t",
        "--server-ca", str(bogus), "--no-generate-key",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "--server-ca" in result.output and "not a PEM certificate" in result.output
    assert not NodeRef("beta", Scope.USER).config_path.exists()


def test_a_broker_ca_of_its_own_is_mounted_beside_the_server_ca(dirs: Dirs, tmp_path: Path) -> None:
    """mqtt_ca_file (a broker whose certificate another CA signed) reaches the dockerized agent too."""
    certs = tls_init(tmp_path / "tls", "localhost")
    broker = tls_init(tmp_path / "broker-tls", "localhost")
    result = vnode(
        "new", "gamma", "--server-url", "https://localhost:7600", "--api-key", "7.s3cr3t",
        "--server-ca", str(certs.ca), "--no-generate-key",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ref = NodeRef("gamma", Scope.USER)
    raw = yaml.safe_load(ref.config_path.read_text())
    raw["mqtt_ca_file"] = str(broker.ca)
    ref.config_path.write_text(yaml.safe_dump(raw))
    settings = load_settings(ref.config_path)
    inside = container.agent_config(ref, settings, "/var/lib/docker/volumes/x/_data")
    assert inside["mqtt_ca_file"] == container.MQTT_CA_IN_CONTAINER
    mounts = {m["Target"]: m["Source"] for m in container.server_ca_mounts(settings)}
    assert mounts == {
        container.SERVER_CA_IN_CONTAINER: str(settings.server_ca_file),
        container.MQTT_CA_IN_CONTAINER: str(broker.ca.resolve()),
    }
    broker.ca.unlink()
    with pytest.raises(container.OperatorError, match="mqtt_ca_file"):
        container.server_ca_mounts(settings)
