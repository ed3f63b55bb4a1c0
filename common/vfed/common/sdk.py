"""What an algorithm image's SDK speaks, recorded at build time in the image label `vfed.sdk`.

`vfed algorithm build` asks the built image's own vfed (it runs `SDK_PROBE` inside it) for its version, the
payload format version (`vfed.common.payload.FORMAT_VERSION`) and the proxy API version (`PROXY_API_VERSION`),
and stores them as JSON: `{"version": "0.1.0", "payload": 1, "proxy": 1}`. The label is bound to the image
digest the node's policy allows. Before a run starts the node compares it with what it speaks itself and
refuses an image that declares a version it does not (`image-incompatible`). An image without the label
(built before it existed, or by hand) is run as before: the label is the SDK's promise, not a requirement.
"""

from __future__ import annotations

import json
from collections.abc import Collection

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vfed.common.payload import FORMAT_VERSION

SDK_LABEL = "vfed.sdk"

PROXY_API_VERSION = 1
"""The version of the proxy's HTTP API that algorithms call (docs/proxy-api.md); raised on a change an
algorithm built for the previous version cannot live with."""

PAYLOAD_VERSIONS: frozenset[int] = frozenset({FORMAT_VERSION})
"""The payload format versions this vfed reads and writes (inputs, results, error outputs)."""
PROXY_VERSIONS: frozenset[int] = frozenset({PROXY_API_VERSION})
"""The proxy API versions this vfed's proxy serves."""

SDK_PROBE = """\
import importlib.metadata as metadata, json
from vfed.common.payload import FORMAT_VERSION
try:
    from vfed.common.sdk import PROXY_API_VERSION
except ImportError:  # an SDK from before the constant: its proxy API is version 1
    PROXY_API_VERSION = 1
sdk = {"version": metadata.version("vfed"), "payload": FORMAT_VERSION, "proxy": PROXY_API_VERSION}
print(json.dumps(sdk))
"""
"""Python run inside a built image (`python3 -c SDK_PROBE`): prints the image's SDK label value."""


class SdkLabelError(ValueError):
    """The `vfed.sdk` label is not a valid SDK declaration."""


class SdkInfo(BaseModel):
    """What the SDK in an image speaks."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: str = Field(min_length=1, max_length=100)
    payload: int = Field(ge=1)
    proxy: int = Field(ge=1)

    def to_label(self) -> str:
        return self.model_dump_json()


def parse_sdk_label(label: str | None) -> SdkInfo | None:
    """The declaration from the label's value; None when there is none. SdkLabelError when malformed."""
    if label is None or not label.strip():
        return None
    try:
        return SdkInfo.model_validate(json.loads(label))
    except (ValueError, ValidationError):
        raise SdkLabelError(f"the image's {SDK_LABEL} label is not a valid SDK declaration") from None


def incompatibility(
    info: SdkInfo,
    payload_versions: Collection[int] = PAYLOAD_VERSIONS,
    proxy_versions: Collection[int] = PROXY_VERSIONS,
) -> str | None:
    """Why an image with this SDK cannot run here (the node's own words, no image text), or None."""
    problems = []
    if info.payload not in payload_versions:
        problems.append(f"payload format {info.payload} (this node speaks {_listed(payload_versions)})")
    if info.proxy not in proxy_versions:
        problems.append(f"proxy API {info.proxy} (this node speaks {_listed(proxy_versions)})")
    if not problems:
        return None
    return "the image's SDK speaks " + " and ".join(problems)


def _listed(versions: Collection[int]) -> str:
    return ", ".join(str(v) for v in sorted(versions))
