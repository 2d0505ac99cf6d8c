"""Crop quality: when a new crop of a tracked object is worth classifying again."""

from __future__ import annotations

from graph.pipeline.quality import CropQuality


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
