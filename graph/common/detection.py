"""What a detector is asked and answers: the one message shape between the camera
actors, the ingress, the media jobs and the Detector deployment."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from graph.common.vision import DetectParams


@dataclass(frozen=True)
class DetectRequest:
    """A letterboxed uint8 BGR image at the model's input size and its decoding params."""

    image: np.ndarray
    params: DetectParams = dataclasses.field(default_factory=DetectParams)


@dataclass(frozen=True)
class DetectResult:
    """Rows (K, 6) x1 y1 x2 y2 conf cls in letterboxed pixels, and the model's class
    names, so labels always come from the engine that produced the boxes."""

    rows: np.ndarray
    names: dict[int, str]
