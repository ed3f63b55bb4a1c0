"""The runtime registry: `runtime.kind` picks a runtime's config model when the node's configuration is read,
and the class the agent builds; both come from one table (registry.KINDS)."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import pytest
from pydantic import Discriminator, Tag

from vfed.node.config import RUNTIME_KINDS, ConfigError, parse_settings
from vfed.node.runtime import RuntimeConfig, registry
from vfed.node.runtime.docker import DockerRuntime
from vfed.node.runtime.docker_config import DockerRuntimeConfig

BASE = {"api_key": "a.b", "data_dir": "/var/lib/vfed"}


def _section_tags() -> list[str]:
    """The kinds RuntimeSection's members are tagged with (one member: its Annotated is flattened)."""
    inner, *meta = get_args(registry.RuntimeSection)
    assert any(isinstance(m, Discriminator) for m in meta)
    if get_origin(inner) in (Union, types.UnionType):
        meta = [m for member in get_args(inner) for m in get_args(member)[1:]]
    return [m.tag for m in meta if isinstance(m, Tag)]


def test_one_table_names_the_kinds() -> None:
    assert tuple(registry.KINDS) == ("docker", "kubernetes")
    assert RUNTIME_KINDS == ("docker", "kubernetes")  # what `vnode new` offers: both run runs end to end
    assert _section_tags() == list(registry.KINDS)  # the union has exactly one member per registered kind
    for kind, entry in registry.KINDS.items():
        assert entry.kind == kind and issubclass(entry.config, RuntimeConfig)
        assert get_args(entry.config.model_fields["kind"].annotation) == (kind,)
        assert entry.config.model_validate({}).kind == kind
    assert registry.DEFAULT_KIND in registry.KINDS


def test_the_section_is_validated_by_the_kinds_own_model() -> None:
    assert parse_settings(BASE).runtime == DockerRuntimeConfig()  # no section: the default runtime
    settings = parse_settings({**BASE, "runtime": {"memory_bytes": 5 << 20}})  # no kind: the default
    assert isinstance(settings.runtime, DockerRuntimeConfig) and settings.runtime.memory_bytes == 5 << 20
    for section, message in [
        ({"kind": "k9s"}, "runtime.kind: unknown runtime 'k9s' (known: docker, kubernetes)"),
        ({"kind": "docker", "memory_mb": 1}, "runtime.memory_mb: Extra inputs are not permitted"),
        ({"uid": 0}, "runtime.uid: Input should be greater than 0"),
        ("docker", "runtime: must be a mapping of the runtime's keys"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_settings({**BASE, "runtime": section})
        assert str(caught.value) == message


def test_build_makes_the_kinds_runtime_without_io(tmp_path: Path) -> None:
    built = registry.build(registry.default_config(), tmp_path)
    assert isinstance(built, DockerRuntime) and built._client is None  # not connected: no I/O before open
    assert built.config.jobs_dir == str(tmp_path / "jobs")  # job folders live with the agent's data
    own = DockerRuntimeConfig(jobs_dir="/srv/jobs")
    kept = registry.build(own, tmp_path)
    assert isinstance(kept, DockerRuntime) and kept.config.jobs_dir == "/srv/jobs"


def test_a_config_of_no_registered_kind_is_refused(tmp_path: Path) -> None:
    class Elsewhere(RuntimeConfig):
        kind: Literal["elsewhere"] = "elsewhere"

    with pytest.raises(registry.UnknownRuntime, match="unknown runtime 'elsewhere'"):
        registry.build(Elsewhere(), tmp_path)
    with pytest.raises(TypeError):
        DockerRuntime.from_config(Elsewhere(), tmp_path)


def test_the_kubernetes_section_is_read_and_built_without_io(tmp_path: Path) -> None:
    from vfed.node.runtime.kubernetes import KubernetesRuntime
    from vfed.node.runtime.kubernetes_config import KubernetesRuntimeConfig

    section = {"kind": "kubernetes", "namespace": "vfed-a", "kubeconfig": "/etc/vfed/kubeconfig", "gpus": 1}
    settings = parse_settings({**BASE, "runtime": section})
    assert isinstance(settings.runtime, KubernetesRuntimeConfig) and settings.runtime.gpus == 1
    built = registry.build(settings.runtime, tmp_path)
    assert isinstance(built, KubernetesRuntime) and built._api is None and built._pool is None
    for bad, message in [
        ({"kind": "kubernetes", "jobs_dir": "/x"}, "runtime.jobs_dir: Extra inputs are not permitted"),
        ({"kind": "kubernetes", "namespace": "Not_A_Name"}, "runtime.namespace: Value error, namespace must"),
        (
            {"kind": "kubernetes", "dataset_sources": {"d": {"claim": "c", "host_path": "/d"}}},
            "runtime.dataset_sources.d: Value error, a dataset source names either claim or host_path",
        ),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_settings({**BASE, "runtime": bad})
        assert str(caught.value).startswith(message), str(caught.value)
