"""Letterbox, decoding and NMS, checked against Ultralytics' and torchvision's own code."""

import numpy as np
import pytest
import torch
import torchvision
from ultralytics.data.augment import LetterBox
from ultralytics.utils import nms as ul_nms
from ultralytics.utils import ops as ul_ops

from graph.common.errors import InferenceError
from graph.common.vision import (
    RECT_STRIDE,
    DetectParams,
    check_fits,
    decode_batch,
    decode_yolo,
    letterbox,
    letterbox_boxes,
    nms,
    stack_padded,
    to_model_input,
    unletterbox_boxes,
)
from tests.onnx_models import yolo_raw

SHAPES = [(480, 640), (640, 480), (720, 1280), (37, 501), (640, 640), (100, 100), (1080, 1920)]


@pytest.mark.parametrize("shape", SHAPES)
def test_letterbox_is_pixel_identical_to_ultralytics(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    ours, _ = letterbox(image, 640)
    reference = LetterBox((640, 640), auto=False, stride=32)(image=image)
    assert ours.shape == (640, 640, 3)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("shape", SHAPES)
def test_rect_letterbox_is_pixel_identical_to_ultralytics_predict(shape: tuple[int, int]) -> None:
    """With a stride, the minimal padding of Ultralytics' `LetterBox(auto=True)`, what
    `predict` feeds a model that takes any input size (720x1280 → 384x640)."""
    image = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    ours, lb = letterbox(image, 640, RECT_STRIDE)
    reference = LetterBox((640, 640), auto=True, stride=RECT_STRIDE)(image=image)
    assert ours.shape == reference.shape
    assert ours.shape[0] % RECT_STRIDE == 0 and ours.shape[1] % RECT_STRIDE == 0
    assert max(ours.shape[:2]) == 640
    np.testing.assert_array_equal(ours, reference)
    xy = np.random.default_rng(1).uniform(0, 300, (20, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + 50], 1)
    want = ul_ops.scale_boxes(ours.shape[:2], torch.from_numpy(boxes.copy()), shape).numpy()
    np.testing.assert_allclose(unletterbox_boxes(boxes, lb), want, atol=1e-3)


def test_a_mixed_batch_is_padded_at_the_bottom_right_so_boxes_keep_their_coordinates() -> None:
    wide = np.full((384, 640, 3), 1, np.uint8)
    tall = np.full((640, 352, 3), 2, np.uint8)
    batch = stack_padded([wide, tall], None, 32)
    assert batch.shape == (2, 640, 640, 3)
    assert (batch[0, :384] == 1).all() and (batch[0, 384:] == 114).all()
    assert (batch[1, :, :352] == 2).all() and (batch[1, :, 352:] == 114).all()
    # Same sizes stack as they are; a stride rounds the batch's size up; a fixed input
    # size pads to it, and an image larger than it is refused.
    assert stack_padded([wide, wide]).shape == (2, 384, 640, 3)
    assert stack_padded([wide[:370]], None, 64).shape == (1, 384, 640, 3)
    assert stack_padded([wide], (640, 640)).shape == (1, 640, 640, 3)
    with pytest.raises(ValueError, match="does not fit"):
        stack_padded([tall], (384, 640))
    with pytest.raises(ValueError, match="empty"):
        stack_padded([])
    with pytest.raises(ValueError, match="uint8"):
        stack_padded([wide.astype(np.float32), tall])


def test_a_frame_larger_than_the_model_is_refused_before_it_joins_a_batch() -> None:
    check_fits(np.zeros((384, 640, 3), np.uint8), 640)
    with pytest.raises(InferenceError, match="larger than the model's 640"):
        check_fits(np.zeros((384, 672, 3), np.uint8), 640)
    with pytest.raises(InferenceError, match="HxWx3 uint8"):
        check_fits(np.zeros((384, 640), np.uint8), 640)


@pytest.mark.parametrize("shape", SHAPES)
def test_unletterbox_matches_ultralytics_scale_boxes(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 640, (50, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(1, 200, (50, 2)).astype(np.float32)], 1)
    _, lb = letterbox(np.zeros((*shape, 3), np.uint8), 640)
    reference = ul_ops.scale_boxes((640, 640), torch.from_numpy(boxes.copy()), shape).numpy()
    np.testing.assert_allclose(unletterbox_boxes(boxes, lb), reference, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_letterbox_round_trip_restores_boxes(shape: tuple[int, int]) -> None:
    h, w = shape
    boxes = np.array([[0, 0, w, h], [w * 0.25, h * 0.1, w * 0.5, h * 0.9]], np.float32)
    _, lb = letterbox(np.zeros((h, w, 3), np.uint8), 640)
    np.testing.assert_allclose(
        unletterbox_boxes(letterbox_boxes(boxes, lb), lb), boxes, atol=1e-3 * max(h, w)
    )


def test_letterbox_pads_with_grey_and_keeps_content_centred() -> None:
    image = np.full((320, 640, 3), 7, np.uint8)
    out, lb = letterbox(image, 640)
    assert (lb.pad_left, lb.pad_top) == (0, 160)
    assert (out[:160] == 114).all() and (out[480:] == 114).all()
    assert (out[160:480] == 7).all()


def test_letterbox_rejects_non_colour_images() -> None:
    with pytest.raises(ValueError, match="HxWx3"):
        letterbox(np.zeros((10, 10), np.uint8))


def test_model_input_is_rgb_chw_unit_range() -> None:
    batch = np.zeros((2, 4, 4, 3), np.uint8)
    batch[..., 0] = 255  # blue in BGR
    tensor = to_model_input(batch)
    assert tensor.shape == (2, 3, 4, 4) and tensor.dtype == np.float32
    assert tensor[:, 2].max() == 1.0 and tensor[:, 0].max() == 0.0
    with pytest.raises(ValueError):
        to_model_input(batch.astype(np.float32))


def test_decode_keeps_best_of_overlapping_same_class_boxes() -> None:
    raw = yolo_raw(
        [(100, 100, 50, 50), (102, 101, 50, 50), (400, 400, 30, 30)],
        [[0.9, 0.0], [0.8, 0.0], [0.0, 0.6]],
    )
    rows = decode_yolo(raw, DetectParams(conf=0.25, iou=0.5))
    assert rows.shape == (2, 6)
    np.testing.assert_allclose(rows[0], [75, 75, 125, 125, 0.9, 0], atol=1e-5)
    np.testing.assert_allclose(rows[1], [385, 385, 415, 415, 0.6, 1], atol=1e-5)


def test_decode_nms_is_class_aware() -> None:
    raw = yolo_raw([(100, 100, 50, 50), (100, 100, 50, 50)], [[0.9, 0.1], [0.1, 0.8]])
    rows = decode_yolo(raw, DetectParams(conf=0.25, iou=0.5))
    assert sorted(rows[:, 5].tolist()) == [0.0, 1.0]


def test_decode_applies_conf_classes_and_max_det() -> None:
    raw = yolo_raw(
        [(50 * i + 20, 50, 10, 10) for i in range(6)],
        [[0.9, 0.0], [0.0, 0.85], [0.3, 0.0], [0.2, 0.0], [0.0, 0.7], [0.95, 0.0]],
    )
    assert len(decode_yolo(raw, DetectParams(conf=0.25))) == 5
    assert decode_yolo(raw, DetectParams(conf=0.25, classes=(1,)))[:, 5].tolist() == [1.0, 1.0]
    top2 = decode_yolo(raw, DetectParams(conf=0.25, max_det=2))
    np.testing.assert_allclose(top2[:, 4], [0.95, 0.9], atol=1e-6)
    assert decode_yolo(raw, DetectParams(conf=0.99)).shape == (0, 6)


def test_decode_rejects_outputs_that_are_not_yolo_shaped() -> None:
    with pytest.raises(ValueError, match="4 \\+ classes"):
        decode_yolo(np.zeros((3, 10), np.float32), DetectParams())
    with pytest.raises(ValueError, match="batch of 2"):
        decode_batch(np.zeros((1, 6, 10), np.float32), [DetectParams(), DetectParams()])


def test_nms_matches_torchvision_on_random_boxes() -> None:
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 500, (400, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 120, (400, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 400).astype(np.float32)
    for iou in (0.3, 0.5, 0.7):
        expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou)
        np.testing.assert_array_equal(nms(boxes, scores, iou), expected.numpy())


@pytest.mark.parametrize("params", [DetectParams(0.25, 0.7), DetectParams(0.1, 0.45, (0, 2), 50)])
def test_decode_matches_ultralytics_non_max_suppression(params: DetectParams) -> None:
    rng = np.random.default_rng(4)
    n, nc = 2000, 3
    xy = rng.uniform(0, 640, (2, n))
    wh = rng.uniform(4, 200, (2, n))
    scores = rng.beta(0.3, 3, (nc, n))
    raw = np.concatenate([xy, wh, scores]).astype(np.float32)
    ours = decode_yolo(raw, params)
    reference = ul_nms.non_max_suppression(
        torch.from_numpy(raw[None]),
        params.conf,
        params.iou,
        classes=list(params.classes) if params.classes else None,
        max_det=params.max_det,
    )[0]
    assert ours.shape == tuple(reference.shape)
    np.testing.assert_allclose(ours, reference.numpy(), atol=1e-3)
