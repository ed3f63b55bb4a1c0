"""The SDK step of a run: an image whose `vfed.sdk` label declares a payload format or proxy API version this
node does not speak is refused before it starts (vfed.common.sdk says what the label holds).

Images without the label run as before. The verdict is remembered per image ID: the ID is the hash of the
image's configuration, labels included, so the same ID always carries the same label and the start path asks
the engine only once per image.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from vfed.common.api import Reason, classified
from vfed.common.sdk import SDK_LABEL, SdkLabelError, incompatibility, parse_sdk_label
from vfed.node.runtime.base import Runtime, VfedRuntimeError

log = logging.getLogger(__name__)

MAX_REMEMBERED = 512


class SdkVerdicts:
    """Why an image may not run here (a classified reason), or None; remembered by image ID."""

    def __init__(self, max_remembered: int = MAX_REMEMBERED) -> None:
        self._verdicts: OrderedDict[str, str | None] = OrderedDict()
        self._max = max_remembered

    async def refusal(self, runtime: Runtime, image_id: str) -> str | None:
        if image_id in self._verdicts:
            self._verdicts.move_to_end(image_id)
            return self._verdicts[image_id]
        try:
            labels = await runtime.image_labels(image_id)
        except VfedRuntimeError as exc:  # not remembered: the engine may answer next time
            log.warning("the labels of image %s are unknown: %s", image_id, exc)
            return classified(Reason.IMAGE_INCOMPATIBLE, "the image's labels cannot be read")
        verdict = _verdict(image_id, labels.get(SDK_LABEL))
        self._verdicts[image_id] = verdict
        if len(self._verdicts) > self._max:
            self._verdicts.popitem(last=False)
        return verdict


def _verdict(image_id: str, label: str | None) -> str | None:
    try:
        info = parse_sdk_label(label)
    except SdkLabelError as exc:
        log.warning("image %s refused: %s", image_id, exc)
        return classified(Reason.IMAGE_INCOMPATIBLE, str(exc))
    if info is None:
        return None
    why = incompatibility(info)
    if why is not None:
        log.warning("image %s refused: %s (vfed %s in the image)", image_id, why, info.version)
        return classified(Reason.IMAGE_INCOMPATIBLE, why)
    return None
