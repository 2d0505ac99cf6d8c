"""Crop quality: when a new crop of a tracked object is worth classifying again."""

from __future__ import annotations

import numpy as np

from graph.events.model import TrackedDetection
from graph.pipeline.quality import CropQuality, crop_quality


def test_a_crop_is_clearly_better_when_whole_larger_sharper_or_surer() -> None:
    old = CropQuality(area=1000, sharpness=10, confidence=0.8, truncated=False)
    assert CropQuality(1400, 10, 0.8, False).clearly_better_than(old)
    assert CropQuality(1000, 20, 0.8, False).clearly_better_than(old)
    assert CropQuality(1000, 10, 0.96, False).clearly_better_than(old)
    assert not CropQuality(1100, 11, 0.85, False).clearly_better_than(old)
    assert not CropQuality(4000, 50, 0.99, True).clearly_better_than(old)  # cut by the edge
    entering = CropQuality(1000, 10, 0.8, True)
    assert not CropQuality(1500, 10, 0.8, True).clearly_better_than(entering)
    assert CropQuality(2000, 10, 0.8, True).clearly_better_than(entering)
    assert CropQuality(900, 10, 0.8, False, occluded=0.0).clearly_better_than(
        CropQuality(1000, 10, 0.8, False, occluded=0.4)
    )
    assert CropQuality(500, 5, 0.6, False).clearly_better_than(CropQuality(1000, 10, 0.8, True))


def test_a_box_at_an_edge_of_what_the_detector_saw_is_truncated() -> None:
    """The frame's edges cut a box; with a subscription's crop region (`bounds`) its
    edges do, and a box touching only the frame's edge outside the region is whole
    where the region itself reaches that edge."""
    image = np.full((720, 1280, 3), 128, np.uint8)

    def cut(box: tuple[float, float, float, float], bounds: tuple | None = None) -> bool:
        det = TrackedDetection(1, 0, "vehicle", 0.9, box, True)
        return crop_quality(image, det, bounds=bounds).truncated

    assert cut((0, 300, 100, 380)) and cut((1200, 300, 1280, 380))
    assert not cut((400, 300, 500, 380))
    roi = (400.0, 0.0, 1100.0, 720.0)
    assert cut((400, 300, 500, 380), roi) and cut((1000, 300, 1100, 380), roi)
    assert not cut((600, 300, 700, 380), roi)
    assert cut((600, 0, 700, 80), roi)  # the region reaches the frame's top edge
