"""Node configuration: good files load, bad ones fail with the key and the problem named."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from vfed.node.cli import main, parse_log_levels
from vfed.node.config import ConfigError, load_settings
from vfed.node.policy import check_run

GOOD = """
name: site-a
server_url: http://127.0.0.1:7600/
api_key: abc.def
data_dir: data
datasets:
  patients: {uri: /data/patients.csv, type: csv}
policies:
  allowed_images:
    - vfed-test/*
    - image: slow/*
      max_run_time_s: 5
    - sha256:%s
  allowed_organizations: [1, 2]
max_concurrent_runs: 2
runtime: {kind: docker, memory_bytes: 268435456}
""" % ("a" * 64)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_good_config_loads_with_relative_paths_resolved(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD))
    assert settings.server_url == "http://127.0.0.1:7600"
    assert settings.data_dir == tmp_path / "data"
    assert settings.key_path == tmp_path / "data" / "org-key.json"
    assert settings.datasets["patients"].type == "csv"
    assert settings.runtime.kind == "docker"
    assert settings.runtime.memory_bytes == 256 * 1024 * 1024
    assert settings.api_key.get_secret_value() == "abc.def"
    assert "abc.def" not in repr(settings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("api_key: abc.def\n", "data_dir: Field required"),
        ("api_key: abc.def\ndata_dir: d\nmax_concurrent_runs: 0\n", "max_concurrent_runs: Input should be"),
        ("api_key: abc.def\ndata_dir: d\nserver_url: ftp://x\n", "server_url: Value error, must start"),
        ("api_key: nodot\ndata_dir: d\n", "api_key: Value error, must be '<key_id>.<secret>'"),
        ("api_key: a.b\ndata_dir: d\nbogus: 1\n", "bogus: Extra inputs are not permitted"),
        ("api_key: a.b\ndata_dir: d\ndatasets: {'9x': {uri: u}}\n", "dataset label '9x'"),
        (
            "api_key: a.b\ndata_dir: d\npolicies: {allowed_images: [{image: x, max_run_time_s: -1}]}\n",
            "policies.allowed_images.0.max_run_time_s",
        ),
        ("- just\n- a list\n", "(top level): the configuration must be a mapping"),
        ("api_key: [unclosed\n", "is not valid YAML at line"),
    ],
)
def test_bad_config_names_key_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert expected in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")


def test_policy_rules(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD))
    ok = check_run(settings, image="vfed-test/echo", digest=None, initiators=[(1, 7)])
    assert ok.allowed and ok.max_run_time_s == settings.max_run_time_s
    slow = check_run(settings, image="slow/x", digest=None, initiators=[(2, None)])
    assert slow.allowed and slow.max_run_time_s == 5
    by_digest = check_run(settings, image="other", digest="sha256:" + "a" * 64, initiators=[(1, None)])
    assert by_digest.allowed
    image_no = check_run(settings, image="evil/x", digest="sha256:" + "b" * 64, initiators=[(1, None)])
    assert not image_no.allowed and "allowed_images" in image_no.reason
    org_no = check_run(settings, image="vfed-test/echo", digest=None, initiators=[(3, None)])
    assert not org_no.allowed and "organization 3" in org_no.reason


def test_policies_hold_for_every_initiator_of_a_subtask(tmp_path: Path) -> None:
    """A subtask's chain of initiators (its own first, the root researcher's last): each must be allowed."""
    orgs = "allowed_organizations: [1, 2]"
    text = GOOD.replace(orgs, orgs + "\n  allowed_users: [7]")
    settings = load_settings(write(tmp_path, text))
    assert check_run(settings, image="vfed-test/x", digest=None, initiators=[(2, None), (1, 7)]).allowed
    root_org = check_run(settings, image="vfed-test/x", digest=None, initiators=[(2, None), (3, 7)])
    assert not root_org.allowed and "organization 3" in root_org.reason
    proxy_org = check_run(settings, image="vfed-test/x", digest=None, initiators=[(3, None), (1, 7)])
    assert not proxy_org.allowed and "organization 3" in proxy_org.reason
    root_user = check_run(settings, image="vfed-test/x", digest=None, initiators=[(2, None), (1, 8)])
    assert not root_user.allowed and "user 8" in root_user.reason
    no_user = check_run(settings, image="vfed-test/x", digest=None, initiators=[(1, None)])
    assert not no_user.allowed and "user None" in no_user.reason
    proxy_user = check_run(settings, image="vfed-test/x", digest=None, initiators=[(2, 9), (1, 7)])
    assert not proxy_user.allowed and "user 9" in proxy_user.reason


def test_trust_settings_default_to_pinned_and_resolve_the_store(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD))
    assert settings.trust == "pinned" and settings.require_researcher_keys is False
    assert settings.trust_store_path == tmp_path / "data" / "trusted_orgs"
    assert (settings.max_subtasks_per_run, settings.max_subtask_depth) == (100, 2)
    tofu = load_settings(write(tmp_path, GOOD + "trust: tofu\ntrust_store: pins/orgs\n"))
    assert tofu.trust == "tofu" and tofu.trust_store_path == tmp_path / "pins" / "orgs"
    with pytest.raises(ConfigError, match="trust"):
        load_settings(write(tmp_path, GOOD + "trust: everyone\n"))


def test_log_levels_per_logger() -> None:
    assert parse_log_levels("info,vfed.node.timeline=debug") == ("INFO", {"vfed.node.timeline": "DEBUG"})
    assert parse_log_levels("WARNING") == ("WARNING", {})
    for bad in ("LOUD", "INFO,vfed.node=LOUD", "INFO,justaname", "INFO,=DEBUG"):
        with pytest.raises(ValueError):
            parse_log_levels(bad)


def test_a_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--config", str(tmp_path / "x.yaml"), "--log-level", "LOUD"])
    assert result.exit_code == 2 and "unknown level 'LOUD'" in result.output
