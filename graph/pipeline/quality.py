"""How good a crop of a tracked object is, for choosing the crop to classify (no Ray).

A crop is clearly better than the one classified before when it is no longer cut by the
frame edge or hidden by other objects, or clearly larger, sharper or more confident; how
much a label read from a crop counts in a branch's vote grows with its size and shrinks
when it is cut or hidden.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from graph.common.vision import Box, cut_by_edge
from graph.events.model import TrackedDetection


@dataclass(frozen=True)
class CropQuality:
    area: float
    sharpness: float  # variance of the Laplacian of the grey crop
    confidence: float
    truncated: bool  # the box touches an edge of what the detector saw: part is missing
    occluded: float = 0.0  # share of the box covered by other detections

    def clearly_better_than(self, old: CropQuality) -> bool:
        if old.truncated != self.truncated:
            return old.truncated
        if abs(old.occluded - self.occluded) > 0.15:
            return self.occluded < old.occluded
        if self.truncated:  # still entering: spend passes on it only when much larger
            return self.area >= 2 * old.area
        if self.area >= 1.3 * old.area and self.confidence >= old.confidence - 0.1:
            return True
        if self.sharpness >= 1.5 * old.sharpness and self.area >= 0.8 * old.area:
            return True
        return self.confidence >= old.confidence + 0.15 and self.area >= 0.8 * old.area

    def weight(self) -> float:
        """How much a label read from this crop counts in the vote."""
        return (
            max(self.area, 1.0) ** 0.5
            * (1.0 - self.occluded) ** 2
            * (0.5 if self.truncated else 1.0)
        )


def crop_box(
    shape: tuple[int, ...], box: tuple[float, float, float, float], padding: float
) -> tuple[int, int, int, int]:
    """The box with `padding` (a fraction of its size) of context, clipped to the frame."""
    h, w = shape[:2]
    x1, y1, x2, y2 = box
    px, py = (x2 - x1) * padding, (y2 - y1) * padding
    return (
        max(0, int(x1 - px)),
        max(0, int(y1 - py)),
        min(w, round(x2 + px)),
        min(h, round(y2 + py)),
    )


def occlusion(box: tuple[float, float, float, float], others: Sequence[tuple[float, ...]]) -> float:
    """The share of `box` that other boxes cover (overlaps summed, at most 1)."""
    x1, y1, x2, y2 = box
    area = max(1e-6, (x2 - x1) * (y2 - y1))
    covered = 0.0
    for ox1, oy1, ox2, oy2 in others:
        w, h = min(x2, ox2) - max(x1, ox1), min(y2, oy2) - max(y1, oy1)
        if w > 0 and h > 0:
            covered += w * h
    return min(1.0, covered / area)


def crop_quality(
    image: np.ndarray,
    det: TrackedDetection,
    others: Sequence[tuple[float, ...]] = (),
    edge_px: int = 2,
    bounds: Box | None = None,
) -> CropQuality:
    """The crop's quality; `bounds`: the part of the image the detector saw (a
    subscription's crop region; None: the whole image), whose edges cut a box."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = det.box
    seen = bounds if bounds is not None else (0.0, 0.0, float(w), float(h))
    ix1, iy1, ix2, iy2 = crop_box(image.shape, det.box, 0)
    grey = cv2.cvtColor(image[iy1:iy2, ix1:ix2], cv2.COLOR_BGR2GRAY)
    if max(grey.shape) > 160:  # sharpness at a common scale, and cheap
        s = 160 / max(grey.shape)
        grey = cv2.resize(grey, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    sharpness = float(cv2.Laplacian(grey, cv2.CV_32F).var()) if grey.size else 0.0
    truncated = cut_by_edge(det.box, seen, 0, edge_px) or cut_by_edge(det.box, seen, 1, edge_px)
    return CropQuality(
        (x2 - x1) * (y2 - y1), sharpness, det.confidence, truncated, occlusion(det.box, others)
    )
