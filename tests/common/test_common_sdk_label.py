"""The `vfed.sdk` image label (vfed.common.sdk): what the probe inside an image prints, how a node reads it
and which declarations it refuses, in its own words only."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vfed.common.payload import FORMAT_VERSION
from vfed.common.sdk import (
    PROXY_API_VERSION,
    SDK_PROBE,
    SdkInfo,
    SdkLabelError,
    incompatibility,
    parse_sdk_label,
)


def _probe(pythonpath: str) -> SdkInfo:
    done = subprocess.run(
        [sys.executable, "-c", SDK_PROBE],
        env={"PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return SdkInfo.model_validate(json.loads(done.stdout))


def test_the_probe_prints_what_this_vfed_speaks() -> None:
    info = _probe(":".join(sys.path))
    assert info == SdkInfo(version=importlib.metadata.version("vfed"), payload=FORMAT_VERSION, proxy=1)
    assert parse_sdk_label(info.to_label()) == info
    assert incompatibility(info) is None


def test_the_probe_in_an_sdk_from_before_the_proxy_version_says_version_1(tmp_path: Path) -> None:
    """Images built FROM an algorithm-base made before vfed.common.sdk existed hold no PROXY_API_VERSION."""
    common = tmp_path / "vfed" / "common"
    common.mkdir(parents=True)
    (common / "__init__.py").write_text("")  # a regular package: found before any other vfed.common
    (common / "payload.py").write_text("FORMAT_VERSION = 5\n")
    site = [p for p in sys.path if p.endswith("site-packages")]  # importlib.metadata finds vfed's dist-info
    info = _probe(":".join([str(tmp_path), *site]))
    assert (info.payload, info.proxy) == (5, 1)


def test_an_image_speaking_another_version_is_refused_in_the_nodes_words() -> None:
    future = SdkInfo(version="9.0", payload=FORMAT_VERSION + 1, proxy=PROXY_API_VERSION)
    assert incompatibility(future) == (
        f"the image's SDK speaks payload format {FORMAT_VERSION + 1} (this node speaks {FORMAT_VERSION})"
    )
    both = SdkInfo(version="0.0.1", payload=7, proxy=5)
    assert incompatibility(both, payload_versions={1, 2}, proxy_versions={1}) == (
        "the image's SDK speaks payload format 7 (this node speaks 1, 2) and proxy API 5 (this node speaks 1)"
    )
    assert incompatibility(both, payload_versions={7}, proxy_versions={5}) is None


def test_no_label_is_no_declaration_and_a_malformed_one_is_refused() -> None:
    assert parse_sdk_label(None) is None and parse_sdk_label("  ") is None
    for bad in ("not json", "[]", '{"version": "1"}', '{"version": "1", "payload": 0, "proxy": 1}', "{}"):
        with pytest.raises(SdkLabelError) as caught:
            parse_sdk_label(bad)
        assert str(caught.value) == "the image's vfed.sdk label is not a valid SDK declaration", bad
    # newer SDKs may say more: unknown keys are ignored, the versions still decide
    wider = parse_sdk_label('{"version": "2.0", "payload": 1, "proxy": 1, "extra": true}')
    assert wider is not None and wider.version == "2.0"
