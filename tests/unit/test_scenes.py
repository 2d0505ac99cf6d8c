"""The synthetic scene generator: deterministic, with truth that matches the pixels."""

import json
from pathlib import Path

import av
import numpy as np
import pytest

from demo.datasets import square_crop, write_clip, yolo_label_lines
from demo.scenes import BODY_TYPES, PLATE_DIGITS, PLATE_LETTERS, Scene


def test_same_seed_same_pixels_and_truth() -> None:
    a, b = Scene(7, n_frames=40), Scene(7, n_frames=40)
    for t in (0, 17, 39):
        (ia, ta, _), (ib, tb, _) = a.render(t), b.render(t)
        np.testing.assert_array_equal(ia, ib)
        assert ta == tb
    assert not np.array_equal(Scene(8, n_frames=40).render(0)[0], a.render(0)[0])


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_boxes_are_tight_around_drawn_pixels_and_flags_are_true(seed: int) -> None:
    scene = Scene(seed, n_frames=60)
    h, w = scene.config.height, scene.config.width
    for t in (0, 30, 59):
        _, truths, labels = scene.render(t)
        assert truths, "a prefilled scene always has objects"
        for obj in truths:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            own = labels == obj.object_id
            visible = int(own.sum())
            assert (visible > 0) == (obj.visible_fraction > 0)
            if not obj.occluded:
                ys, xs = np.nonzero(own)
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box
                assert obj.visible_fraction == 1.0
            else:
                assert obj.visible_fraction < 1.0
                if visible:  # what shows stays inside the (amodal) box
                    ys, xs = np.nonzero(own)
                    assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
            touches_edge = x1 == 0 or y1 == 0 or x2 == w or y2 == h
            if obj.truncated:
                assert touches_edge


def test_scenes_cover_all_body_types_and_readable_plates() -> None:
    seen, plate_heights = set(), []
    for seed in range(12):
        for obj in Scene(seed, n_frames=1).render(0)[1]:
            if obj.cls != "vehicle":
                continue
            seen.add(obj.body_type)
            assert obj.plate is not None and len(obj.plate) == 7
            assert all(c in PLATE_LETTERS for c in obj.plate[:2] + obj.plate[5:])
            assert all(c in PLATE_DIGITS for c in obj.plate[2:5])
            if obj.plate_box:
                plate_heights.append(obj.plate_box[3] - obj.plate_box[1])
    assert seen == set(BODY_TYPES)
    assert max(plate_heights) >= 30, "near-lane plates must be large enough to read"


def test_yolo_labels_are_normalised_and_skip_hidden_objects() -> None:
    _, truths, _ = Scene(5, n_frames=1).render(0)
    lines = yolo_label_lines(truths, 1280, 720)
    assert 0 < len(lines) <= len(truths)
    for line in lines:
        cls, *coords = line.split()
        assert cls in ("0", "1") and all(0 <= float(v) <= 1 for v in coords)


def test_square_crop_letterboxes_into_a_square() -> None:
    image = np.full((100, 300, 3), 200, np.uint8)
    crop = square_crop(image, (50, 20, 250, 80), size=64)
    assert crop.shape == (64, 64, 3)
    assert (crop[0, 32] == 114).all() and (crop[32, 32] == 200).all()


def test_clip_has_no_b_frames_a_keyframe_a_second_and_truth_per_frame(tmp_path: Path) -> None:
    video = write_clip(11, n_frames=25, video_path=tmp_path / "clip.mp4", fps=10, scale=0.5)
    truth = json.loads(video.with_suffix(".json").read_text())
    assert len(truth["frames"]) == 25 and (truth["width"], truth["height"]) == (640, 360)
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        keyframes, pict_types, frames = [], set(), 0
        for packet in container.demux(stream):
            if packet.size and packet.is_keyframe:
                keyframes.append(packet.pts)
            for frame in packet.decode():
                pict_types.add(
                    frame.pict_type.name
                    if hasattr(frame.pict_type, "name")
                    else str(frame.pict_type)
                )
                frames += 1
    assert frames == 25
    assert not any(p == "B" for p in pict_types)
    assert len(keyframes) >= 3
