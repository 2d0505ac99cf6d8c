"""What a detector is asked and answers: the one message shape between the camera
actors, the ingress, the media jobs and the Detector deployment."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from graph.common.errors import InferenceError
from graph.common.vision import DetectParams, Letterbox


@dataclass(frozen=True)
class DetectRequest:
    """A letterboxed uint8 BGR image, at most the model's input size in each dimension
    (`letterbox(..., stride=RECT_STRIDE)`), and its decoding params."""

    image: np.ndarray
    params: DetectParams = dataclasses.field(default_factory=DetectParams)


@dataclass(frozen=True)
class EncodedImage:
    """An uploaded image as its client sent it (JPEG, PNG...): the detector replica
    decodes and letterboxes it, so the ingress forwards bytes, not pixels. Refused
    (BadImageError) past `max_pixels`, from its header before decoding."""

    data: bytes
    max_pixels: int
    params: DetectParams = dataclasses.field(default_factory=DetectParams)


@dataclass(frozen=True)
class DetectResult:
    """Rows (K, 6) x1 y1 x2 y2 conf cls in letterboxed pixels, and the model's class
    names, so labels always come from the engine that produced the boxes. For an
    `EncodedImage`, `letterbox` says how the replica fitted it to the model input."""

    rows: np.ndarray
    names: dict[int, str]
    letterbox: Letterbox | None = None
    # Frames the replica still held (queued or running) for other calls when it
    # answered; None: not said. A camera actor's dispatcher reads it: 0 means the
    # replica had room, and a fractional call slot need not idle (dispatch.py).
    backlog: int | None = None


def per_frame(results: Sequence[Any]) -> list[Any]:
    """`gather(..., return_exceptions=True)` of one call's frames, ready to go back: a
    frame's error stays in its place as a plain `InferenceError` (always picklable),
    and a cancellation is not swallowed."""
    out: list[Any] = []
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # CancelledError, KeyboardInterrupt: not a frame's failure
        if isinstance(result, Exception):
            result = InferenceError(f"{type(result).__name__}: {str(result)[:500]}")
        out.append(result)
    return out


def with_backlog(answers: list[Any], backlog: int) -> list[Any]:
    """One call's answers (`per_frame`), each result told the frames its replica still
    held for other calls (`DetectResult.backlog`, at least 0); errors stay as they are."""
    backlog = max(int(backlog), 0)
    return [
        dataclasses.replace(a, backlog=backlog) if isinstance(a, DetectResult) else a
        for a in answers
    ]
