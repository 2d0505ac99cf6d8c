"""Golden test: camgraph's engine against Ultralytics' own predictions, same ONNX file,
same images, same imgsz/conf/iou (a reference no one here wrote)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import ultralytics
from ultralytics import YOLO

from demo.datasets import HELD_OUT_SEED_START
from demo.scenes import Scene
from deployments.inference.engines import EngineOptions, OnnxEngine, load_engine
from graph.common.vision import (
    RECT_STRIDE,
    DetectParams,
    iou_matrix,
    letterbox,
    unletterbox_boxes,
)
from graph.config import PROJECT_ROOT

MODEL = PROJECT_ROOT / "models" / "demo-detector.onnx"
ASSETS = Path(ultralytics.__file__).parent / "assets"


def images() -> dict[str, np.ndarray]:
    out = {name: cv2.imread(str(ASSETS / name)) for name in ("bus.jpg", "zidane.jpg")}
    for k in range(4):
        scene = Scene(HELD_OUT_SEED_START + 50 + k, n_frames=30)
        out[f"scene{k}"] = scene.render(10 * k)[0]
    out["scene-portrait"] = np.ascontiguousarray(out["scene0"][:, 300:700])
    return out


IMAGES = images()


@pytest.fixture(scope="module")
def engine() -> OnnxEngine:
    return OnnxEngine(MODEL, imgsz=640, intra_op_threads=2)


@pytest.fixture(scope="module")
def reference() -> YOLO:
    return YOLO(str(MODEL), task="detect")


def ours(
    engine: OnnxEngine, image: np.ndarray, params: DetectParams, rect: bool = True
) -> np.ndarray:
    """What a camera frame gets: letterboxed to its own aspect ratio (`rect`, as the
    camera actors and the replicas do) or to the full square."""
    boxed, lb = letterbox(image, 640, RECT_STRIDE if rect else None)
    rows = engine.detect(engine.batch([boxed]), [params])[0]
    rows[:, :4] = unletterbox_boxes(rows[:, :4], lb)
    return rows


@pytest.mark.parametrize("name", list(IMAGES))
@pytest.mark.parametrize("conf, iou", [(0.25, 0.7), (0.05, 0.45)])
@pytest.mark.parametrize("rect", [True, False])
def test_engine_matches_ultralytics_predict(
    engine: OnnxEngine, reference: YOLO, name: str, conf: float, iou: float, rect: bool
) -> None:
    image = IMAGES[name]
    got = ours(engine, image, DetectParams(conf=conf, iou=iou), rect)
    result = reference.predict(
        image, imgsz=640, conf=conf, iou=iou, rect=rect, verbose=False, device="cpu"
    )[0]
    want = result.boxes.data.numpy()
    assert len(got) == len(want)
    if name.startswith("scene"):
        assert len(want) > 0, "the trained detector must see the synthetic scene"
    order_got, order_want = np.lexsort(got[:, :4].T), np.lexsort(want[:, :4].T)
    got, want = got[order_got], want[order_want]
    np.testing.assert_array_equal(got[:, 5], want[:, 5])
    np.testing.assert_allclose(got[:, :4], want[:, :4], atol=1.0)
    np.testing.assert_allclose(got[:, 4], want[:, 4], atol=1e-3)


def test_batched_inference_equals_one_by_one(engine: OnnxEngine) -> None:
    scenes = [IMAGES[f"scene{k}"] for k in range(4)]
    batch = np.stack([letterbox(im, 640)[0] for im in scenes])
    together = engine.detect(batch, [DetectParams()] * 4)
    for k in range(4):
        alone = engine.detect(batch[k : k + 1], [DetectParams()])[0]
        np.testing.assert_allclose(together[k], alone, atol=1e-3)


def test_pt_model_is_exported_and_agrees_with_the_committed_onnx_export(
    engine: OnnxEngine, tmp_path: Path
) -> None:
    pt = PROJECT_ROOT / "models" / "demo-detector.pt"
    pt_engine = load_engine(pt, EngineOptions(onnx_cache_dir=tmp_path))
    assert pt_engine.names == {0: "vehicle", 1: "person"}
    boxed, _ = letterbox(IMAGES["scene1"], 640)
    from_pt = pt_engine.detect(boxed[None], [DetectParams()])[0]
    from_onnx = engine.detect(boxed[None], [DetectParams()])[0]
    assert len(from_pt) == len(from_onnx) > 0
    key_pt, key_onnx = np.lexsort(from_pt[:, :4].T), np.lexsort(from_onnx[:, :4].T)
    np.testing.assert_allclose(from_pt[key_pt, :4], from_onnx[key_onnx, :4], atol=1.0)
    # The export has a fixed 640x640 input: a camera's 640x384 frame is padded to it at
    # the bottom, and finds the confident boxes the dynamic export finds at 640x384.
    assert pt_engine.input_hw == (640, 640) and engine.input_hw is None
    rect, _ = letterbox(IMAGES["scene1"], 640, RECT_STRIDE)
    padded = pt_engine.detect(pt_engine.batch([rect]), [DetectParams()])[0]
    as_is = engine.detect(engine.batch([rect]), [DetectParams()])[0]
    for mine, other in ((padded, as_is), (as_is, padded)):
        sure = mine[mine[:, 4] >= 0.4]
        assert len(sure) > 0
        assert (iou_matrix(sure[:, :4], other[:, :4]).max(axis=1) > 0.9).all()


def test_served_detector_finds_nine_in_ten_vehicles_in_unseen_frames(engine: OnnxEngine) -> None:
    from demo.datasets import EVAL_SEED_START
    from demo.metrics import iou_matrix

    found = total = 0
    for k in range(8):
        image, truths, _ = Scene(EVAL_SEED_START + 300 + k, n_frames=1).render(0)
        gt = np.array(
            [t.box for t in truths if t.cls == "vehicle" and t.visible_fraction >= 0.5], float
        ).reshape(-1, 4)
        rows = ours(engine, image, DetectParams(conf=0.25))
        vehicles = rows[rows[:, 5] == 0, :4]
        total += len(gt)
        found += int((iou_matrix(gt, vehicles) >= 0.5).any(axis=1).sum())
    assert total > 40
    assert found / total >= 0.9


def test_a_batch_of_frames_of_different_shapes_gives_each_its_own_boxes(
    engine: OnnxEngine,
) -> None:
    """Cameras of other aspect ratios share a batch: padded at the bottom right to one
    size, every frame keeps the confident boxes it gets alone."""
    four_three = np.ascontiguousarray(IMAGES["scene1"][:, 160:1120])  # 720x960
    images = [IMAGES["scene0"], IMAGES["scene-portrait"], four_three]
    boxed = [letterbox(im, 640, RECT_STRIDE) for im in images]
    assert len({b.shape for b, _ in boxed}) == 3
    together = engine.detect(engine.batch([b for b, _ in boxed]), [DetectParams()] * 3)
    for (b, _), rows in zip(boxed, together, strict=True):
        alone = engine.detect(engine.batch([b]), [DetectParams()])[0]
        # Borderline boxes (near conf 0.25) may come and go with the padding; every
        # confident one is found both ways.
        for mine, other in ((alone, rows), (rows, alone)):
            sure = mine[mine[:, 4] >= 0.4]
            assert len(sure) > 0
            best = iou_matrix(sure[:, :4], other[:, :4]).max(axis=1)
            assert (best > 0.9).all(), best
