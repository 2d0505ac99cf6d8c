"""What each branch of a pass classifies (no Ray): the object's crop, the crop of another
detection that belongs to the object (`cropClass`, e.g. a plate inside a car), or the
whole frame (`crop` false, as in the detector-worker).

A detection belongs to an object when at least `MIN_INSIDE` of its box lies inside the
object's box; of several, the most confident one is used. A branch whose detection is
not in this frame has no input on this pass and is tried again on a later one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from graph.common.vision import Box
from graph.events.model import TrackedDetection
from graph.pipeline.plan import BranchPlan
from graph.pipeline.quality import crop_box

MIN_INSIDE = 0.6  # share of a detection's box inside the object's box to belong to it


def inside_share(inner: Box, outer: Box) -> float:
    """The share of `inner`'s area that lies inside `outer` (0 for an empty box)."""
    x1, y1, x2, y2 = inner
    area = (x2 - x1) * (y2 - y1)
    if area <= 0:
        return 0.0
    w = min(x2, outer[2]) - max(x1, outer[0])
    h = min(y2, outer[3]) - max(y1, outer[1])
    return max(0.0, w) * max(0.0, h) / area


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def belonging(
    detections: Iterable[TrackedDetection], obj: TrackedDetection, label: str
) -> TrackedDetection | None:
    """The detection of class `label` in the same frame that belongs to `obj`: at least
    `MIN_INSIDE` of its box inside the object's box, and no other object of `obj`'s
    class holding more of it (a plate between two overlapping cars is the one of the
    car it lies in most, the tighter box on a tie: never credited to both); the most
    confident of several."""
    detections = list(detections)
    order = {id(o): i for i, o in enumerate(detections) if o.label == obj.label}

    def fit(d: TrackedDetection, o: TrackedDetection) -> tuple[float, float, int]:
        # more of it inside, then the tighter box, then the first listed: one owner
        return inside_share(d.box, o.box), -_area(o.box), -order.get(id(o), -1)

    objects = [o for o in detections if o.label == obj.label and o is not obj]
    candidates = [
        d
        for d in detections
        if d is not obj
        and d.label == label
        and inside_share(d.box, obj.box) >= MIN_INSIDE
        and all(fit(d, o) < fit(d, obj) for o in objects)
    ]
    return max(candidates, key=lambda d: d.confidence, default=None)


def branch_inputs(
    branches: Sequence[BranchPlan],
    object_class: str,
    image: np.ndarray,
    obj: TrackedDetection,
    crop: np.ndarray,
    detections: Sequence[TrackedDetection],
    padding: float,
) -> dict[str | None, np.ndarray]:
    """What the branches classify on one pass, by `BranchPlan.source`: the object's own
    class → its crop, another class → the crop of the detection that belongs to it
    (absent when none does), None → the whole frame (a reference, not a copy)."""
    inputs: dict[str | None, np.ndarray] = {object_class: crop}
    for b in branches:
        source = b.source(object_class)
        if source in inputs:
            continue
        if source is None:
            inputs[None] = image
            continue
        det = belonging(detections, obj, source)
        if det is None:
            continue
        x1, y1, x2, y2 = crop_box(image.shape, det.box, padding)
        part = image[y1:y2, x1:x2]
        if part.size:
            inputs[source] = part.copy()
    return inputs
