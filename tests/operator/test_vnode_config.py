"""`vnode new`, `vnode keys`, `vnode files` and NAME resolution, through the real CLI and real files.

No Docker and no server needed here, except `keys upload`, which is tested against a real server in
test_vnode_lifecycle.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from vnode_testlib import Dirs, dirs, new_node, unique, vnode

from vfed.common.crypto import Keyring
from vfed.common.trust import TrustStore, fingerprint, show_fingerprint
from vfed.node.config import load_settings

__all__ = ["dirs"]


def test_new_from_flags_writes_a_config_the_agent_accepts(dirs: Dirs, tmp_path: Path) -> None:
    table = tmp_path / "patients.csv"
    table.write_text("age\n40\n")
    result = vnode(
        "new", "alpha",
        "--server-url", "http://10.0.0.5:7600/",
        "--api-key", "7.s3cr3t",
        "--dataset", f"patients={table}",
        "--dataset", f"extra={table}:parquet",
        "--mqtt-url", "mqtt://10.0.0.5:1883",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    path = dirs.user_config / "vfed" / "nodes" / "alpha.yaml"
    assert f"wrote {path}" in result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the API key
    settings = load_settings(path)
    assert settings.name == "alpha"
    assert settings.server_url == "http://10.0.0.5:7600"
    assert settings.api_key.get_secret_value() == "7.s3cr3t"
    assert settings.mqtt_url == "mqtt://10.0.0.5:1883"
    assert settings.runtime.kind == "docker"
    assert yaml.safe_load(path.read_text())["trust"] == "pinned"  # written out, not only the default
    assert {k: (v.uri, v.type) for k, v in settings.datasets.items()} == {
        "patients": (str(table), "csv"),
        "extra": (str(table), "parquet"),
    }
    assert settings.data_dir == dirs.user_data / "vfed" / "nodes" / "alpha"
    # No key existed: one was generated (0600) where the config points, and it loads.
    assert stat.S_IMODE(settings.key_path.stat().st_mode) == 0o600
    key_id = Keyring.load(settings.key_path).current.key_id
    assert f"generated organization key {key_id}" in result.output


def test_new_system_scope_and_no_overwrite_without_force(dirs: Dirs) -> None:
    new_node("beta", "1.a", "--system", "--no-generate-key")
    path = dirs.system_config / "nodes" / "beta.yaml"
    assert load_settings(path).data_dir == dirs.system_data / "nodes" / "beta"
    assert not (dirs.user_config / "vfed" / "nodes" / "beta.yaml").exists()
    again = vnode("new", "beta", "--system", "--api-key", "2.b")
    assert again.exit_code == 1
    assert "exists; add --force" in again.output
    assert load_settings(path).api_key.get_secret_value() == "1.a"
    forced = vnode("new", "beta", "--system", "--api-key", "2.b", "--force", "--no-generate-key")
    assert forced.exit_code == 0, forced.output
    assert load_settings(path).api_key.get_secret_value() == "2.b"


def test_new_usage_errors_exit_2_and_bad_values_exit_1(dirs: Dirs) -> None:
    missing_key = vnode("new", "gamma")
    assert missing_key.exit_code == 2
    assert "--api-key is required when not run interactively" in missing_key.output
    bad_name = vnode("new", "Bad Name", "--api-key", "1.x")
    assert bad_name.exit_code == 2
    assert "invalid node name 'Bad Name'" in bad_name.output
    bad_dataset = vnode("new", "gamma", "--api-key", "1.x", "--dataset", "nolabel")
    assert bad_dataset.exit_code == 2
    assert "expected LABEL=URI[:TYPE]" in bad_dataset.output
    bad_key = vnode("new", "gamma", "--api-key", "no-dot-in-it")
    assert bad_key.exit_code == 1
    assert "api_key: " in bad_key.output and "<key_id>.<secret>" in bad_key.output
    bad_url = vnode("new", "gamma", "--api-key", "1.x", "--server-url", "ftp://x")
    assert bad_url.exit_code == 1
    assert "server_url: " in bad_url.output
    assert not (dirs.user_config / "vfed" / "nodes" / "gamma.yaml").exists()


def test_new_asks_questions_when_answers_are_typed(
    dirs: Dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CliRunner is not a terminal: `interactive` is told a person is typing; the answers go through stdin."""
    import vfed.node.operator.new as new_module

    monkeypatch.setattr(new_module, "interactive", lambda: True)
    table = tmp_path / "t.csv"
    table.write_text("a\n1\n")
    answers = "\n".join(["delta", "", "5.abc", f"t={table}", "", "", "", "n"]) + "\n"
    result = vnode("new", input=answers)
    assert result.exit_code == 0, result.output
    settings = load_settings(dirs.user_config / "vfed" / "nodes" / "delta.yaml")
    assert settings.server_url == "http://127.0.0.1:7600"  # the default, taken with Enter
    assert settings.api_key.get_secret_value() == "5.abc"
    assert list(settings.datasets) == ["t"]
    assert not settings.key_path.exists()  # answered "n" to generating a key


def test_name_resolution(dirs: Dirs) -> None:
    nothing = vnode("files")
    assert nothing.exit_code == 1 and "no node configured in the user scope" in nothing.output
    new_node("one", "1.a", "--no-generate-key")
    only = vnode("files", "--format", "json")
    assert only.exit_code == 0, only.output
    assert json.loads(only.output)["config"].endswith("/nodes/one.yaml")
    new_node("two", "1.b", "--no-generate-key")
    several = vnode("files")
    assert several.exit_code == 2
    assert "several nodes in the user scope, name one: one, two" in several.output
    unknown = vnode("files", "three")
    assert unknown.exit_code == 1 and "no such node: 'three' in the user scope" in unknown.output
    new_node("sys", "1.c", "--system", "--no-generate-key")
    other_scope = vnode("files", "sys")
    assert other_scope.exit_code == 1 and "add --system" in other_scope.output
    assert vnode("files", "sys", "--system").exit_code == 0


def test_invalid_config_names_the_key(dirs: Dirs) -> None:
    new_node("broken", "1.a", "--no-generate-key")
    path = dirs.user_config / "vfed" / "nodes" / "broken.yaml"
    data = yaml.safe_load(path.read_text())
    data["max_concurrent_runs"] = 0
    path.write_text(yaml.safe_dump(data))
    result = vnode("files", "broken")
    assert result.exit_code == 1
    assert f"invalid config {path}: max_concurrent_runs:" in result.output
    assert len(result.output.strip().splitlines()) == 1
    path.write_text("name: [unclosed\n")
    result = vnode("keys", "show", "broken")
    assert result.exit_code == 1 and "is not valid YAML at line" in result.output


def test_files_shows_where_everything_is(dirs: Dirs) -> None:
    new_node("filer", "1.a")
    result = vnode("files", "filer")
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.strip().splitlines())
    assert lines["config"] == str(dirs.user_config / "vfed" / "nodes" / "filer.yaml")
    assert lines["key"] == str(dirs.user_data / "vfed" / "nodes" / "filer" / "org-key.json")
    assert lines["trust_store"] == str(dirs.user_data / "vfed" / "nodes" / "filer" / "trusted_orgs")
    assert lines["volume"] == "vfed-filer-vol"
    assert "journal.sqlite3" in lines["journal"]
    assert "vfed-filer-user" in lines["logs"]


def test_keys_generate_show_rotate_with_passphrase(dirs: Dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("k")
    new_node(name, "1.a", "--no-generate-key")
    monkeypatch.setenv("TEST_VFED_PASS", "a long enough passphrase")
    made = vnode("keys", "generate", name, "--passphrase-env", "TEST_VFED_PASS")
    assert made.exit_code == 0, made.output
    settings = load_settings(dirs.user_config / "vfed" / "nodes" / f"{name}.yaml")
    assert settings.private_key_passphrase_env == "TEST_VFED_PASS"  # recorded for the agent
    assert stat.S_IMODE(settings.key_path.stat().st_mode) == 0o600
    first = Keyring.load(settings.key_path, "a long enough passphrase").current
    shown = vnode("keys", "show", name, "--format", "json")
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.output)
    assert doc == {
        "fingerprint": fingerprint(first.public),
        "key_id": first.key_id,
        "public_key": first.public.to_text(),
        "older_key_ids": [],
    }
    refused = vnode("keys", "generate", name)
    assert refused.exit_code == 1 and "exists; add --force" in refused.output
    rotated = vnode("keys", "rotate", name, "--no-upload")
    assert rotated.exit_code == 0, rotated.output
    ring = Keyring.load(settings.key_path, "a long enough passphrase")
    assert ring.keys[0].key_id == first.key_id and len(ring.keys) == 2  # the old key stays
    text = vnode("keys", "show", name).output
    assert f"key_id:      {ring.current.key_id}" in text and f"older keys:  {first.key_id}" in text
    assert f"fingerprint: {fingerprint(first.public)}" in text  # the first key's, after any rotation
    assert "vnode trust ORG --fingerprint" in text
    monkeypatch.setenv("TEST_VFED_PASS", "the wrong one")
    wrong = vnode("keys", "show", name)
    assert wrong.exit_code == 1 and "cannot open key file" in wrong.output


def test_keys_show_without_a_key_says_how_to_make_one(dirs: Dirs) -> None:
    new_node("nokey", "1.a", "--no-generate-key")
    result = vnode("keys", "show", "nokey")
    assert result.exit_code == 1
    assert "create one with `vnode keys generate`" in result.output


def test_help_has_examples() -> None:
    commands = (["new"], ["keys"], ["trust"], ["users"], ["start"], ["stop"], ["list"], ["attach"], ["files"])
    for command in (*commands, ["clean"]):
        result = vnode(*command, "--help")
        assert result.exit_code == 0
        assert "Examples:" in result.output, command
        assert "--user / --system" in result.output or command in (["list"], ["keys"], ["users"])


def test_name_is_chosen_from_a_list_on_a_terminal(dirs: Dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """CliRunner is not a terminal: `interactive` is told a person is typing the choice on stdin."""
    import vfed.node.operator.paths as paths_module

    new_node("left", "1.a", "--no-generate-key")
    new_node("right", "1.b", "--no-generate-key")
    monkeypatch.setattr(paths_module, "interactive", lambda: True)
    result = vnode("files", "--format", "json", input="2\n")
    assert result.exit_code == 0, result.output
    assert "1) left" in result.output and "2) right" in result.output
    assert '"config": "' + str(dirs.user_config / "vfed" / "nodes" / "right.yaml") in result.output


def test_list_shows_both_scopes_and_broken_configs(dirs: Dirs) -> None:
    new_node("listed", "1.a", "--no-generate-key", "--dataset", "d=/data/d.csv")
    new_node("sysnode", "1.b", "--system", "--no-generate-key")
    (dirs.system_config / "nodes" / "broken.yaml").write_text("api_key: 1.x\n")  # no data_dir
    rows = {r["name"]: r for r in json.loads(vnode("list", "--format", "json").stdout)}
    assert set(rows) == {"listed", "sysnode", "broken"}
    assert rows["listed"]["scope"] == "user" and rows["listed"]["datasets"] == ["d"]
    assert rows["sysnode"]["scope"] == "system"
    for name in ("listed", "sysnode"):
        assert rows[name]["running"] is False and rows[name]["status"] == "offline"
        assert rows[name]["runtime"] == "docker" and rows[name]["error"] is None
    assert "invalid config: data_dir: Field required" in rows["broken"]["error"]
    table = vnode("list")
    assert table.exit_code == 0
    head, *lines = table.output.strip().splitlines()
    assert head.split() == ["NAME", "SCOPE", "RUNNING", "SERVER", "RUNTIME", "DATASETS"]
    assert any(line.split()[:6] == ["listed", "user", "no", "offline", "docker", "d"] for line in lines)


def test_trust_untrust_and_list_edit_the_nodes_trust_store(dirs: Dirs) -> None:
    name = unique("t")
    new_node(name, "1.a", "--no-generate-key")
    settings = load_settings(dirs.user_config / "vfed" / "nodes" / f"{name}.yaml")
    other = Keyring.generate().current.public
    empty = vnode("trust", "list", name)
    assert empty.exit_code == 0 and "no organization pinned" in empty.output and "pinned" in empty.output
    typed = " ".join(other.key_id[i : i + 8].upper() for i in range(0, 32, 8))  # as read out loud
    pinned = vnode("trust", "3", name, "--fingerprint", typed, "--note", "hospital b")
    assert pinned.exit_code == 0, pinned.output
    assert f"pinned organization 3 to {fingerprint(other)}" in pinned.output
    store = TrustStore(settings.trust_store_path)
    pin = store.get(3)
    assert pin is not None and pin.root == other.key_id and pin.note == "hospital b"
    head = Keyring.generate().current.key_id
    repinned = vnode("trust", "3", name, "--fingerprint", other.key_id, "--head", head)
    assert repinned.exit_code == 0, repinned.output
    listed = vnode("trust", "list", name, "--format", "json")
    assert json.loads(listed.output) == [
        {"organization_id": 3, "fingerprint": show_fingerprint(other.key_id), "head": head, "note": ""}
    ]
    assert f"3  {fingerprint(other)}  head={head}" in vnode("trust", "list", name).output
    bad = vnode("trust", "4", name, "--fingerprint", "not-a-fingerprint")
    assert bad.exit_code == 2 and "is not a key fingerprint" in bad.output
    missing = vnode("trust", "4", name)
    assert missing.exit_code == 2 and "--fingerprint is required" in missing.output
    removed = vnode("untrust", "3", name)
    assert removed.exit_code == 0 and "removed the pin of organization 3" in removed.output
    assert TrustStore(settings.trust_store_path).get(3) is None
    again = vnode("untrust", "3", name)
    assert again.exit_code == 1 and "is not pinned" in again.output


def test_new_kubernetes_writes_a_config_the_agent_accepts_and_start_refuses_bad_combinations(
    dirs: Dirs, tmp_path: Path
) -> None:
    """`vnode new --runtime kubernetes` writes the runtime's section from its options (the agent's own model
    reads it back); options of the other runtime, or values that cannot work, are one line and exit 2; such a
    node's agent starts with --no-container (its runs go to the cluster), not in a local container."""
    from vfed.node.config import RUNTIME_KINDS
    from vfed.node.runtime.kubernetes_config import KubernetesRuntimeConfig

    assert RUNTIME_KINDS == ("docker", "kubernetes")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    name = unique("k8s")
    made = new_node(name, "1.s", "--runtime", "kubernetes", "--namespace", "vfed-site",
                    "--kubeconfig", str(kubeconfig), "--kube-context", "prod", "--proxy-port", "9443",
                    "--proxy-listen", "10.0.0.4:9444", "--proxy-ip-block", "10.0.0.4/32")  # fmt: skip
    assert f"next: `vnode start {name} --no-container`" in made.output
    runtime = load_settings(dirs.user_config / "vfed" / "nodes" / f"{name}.yaml").runtime
    assert runtime == KubernetesRuntimeConfig(
        namespace="vfed-site",
        kubeconfig=str(kubeconfig),
        context="prod",
        proxy_service="vfed-node-proxy",  # the manifests' Service (docker/kubernetes/node/base/service.yaml)
        proxy_port=9443,
        proxy_listen_host="10.0.0.4",
        proxy_listen_port=9444,
        proxy_ip_blocks=["10.0.0.4/32"],
    )
    in_cluster = unique("k8s")
    new_node(in_cluster, "1.s", "--runtime", "kubernetes")
    section = yaml.safe_load((dirs.user_config / "vfed" / "nodes" / f"{in_cluster}.yaml").read_text())
    assert section["runtime"] == {"kind": "kubernetes", "proxy_service": "vfed-node-proxy"}  # in-cluster
    base = ("new", unique("bad"), "--server-url", "http://127.0.0.1:9", "--api-key", "1.s")
    for extra, message in [
        (("--namespace", "x"), "--namespace: is an option of --runtime kubernetes, not of docker"),
        (("--runtime", "kubernetes", "--kubeconfig", str(tmp_path / "absent")), "absent is not a file"),
        (("--runtime", "kubernetes", "--proxy-listen", "proxy.local"), "HOST is an IP address"),
        (("--runtime", "kubernetes", "--proxy-listen", "0.0.0.0:99999"), "PORT is a number from 1 to 65535"),
        (("--runtime", "kubernetes", "--proxy-ip-block", "10.0.0.0/33"), "is not a CIDR"),
        (("--runtime", "k9s"), "'k9s' is not one of 'docker', 'kubernetes'"),
    ]:
        refused = vnode(*base, *extra)
        assert refused.exit_code == 2 and message in refused.output, (extra, refused.output)
    for args, message in [
        ((name,), f"--no-container: node {name} (user) runs its runs with the kubernetes runtime"),
        ((name, "--no-container", "--attach"), "--attach: starts an agent container; --no-container runs"),
        ((name, "--no-container", "--timeout", "5"), "--timeout: starts an agent container"),
        ((name, "--no-container", "--log-level", "LOUD"), "unknown level 'LOUD'"),
        ((name, "--log-level", "DEBUG"), "--log-level: goes with --no-container"),
    ]:
        refused = vnode("start", *args)
        assert refused.exit_code == 2 and message in refused.output, (args, refused.output)
        assert "Traceback" not in refused.output
