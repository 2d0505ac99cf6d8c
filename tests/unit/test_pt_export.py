"""`.pt` models are exported to ONNX once (after the pickle checks), cached by sha256 and
served like ONNX models: a tiny random-weight YOLOv8 detector and classifier, built here,
against Ultralytics' own predictions on the same `.pt` (a reference no one here wrote)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import ultralytics
from ultralytics import YOLO
from ultralytics.engine.exporter import Exporter

from deployments.inference.classify import BranchEngine
from deployments.inference.engines import EngineOptions, ModelSlot, load_engine
from deployments.inference.gpu import CPU
from deployments.inference.pt_models import export_onnx
from graph.common.errors import ModelLoadError
from graph.common.schemas import BranchModelSpec
from graph.common.vision import DetectParams, letterbox, unletterbox_boxes
from graph.pipeline.ptload import UnsafeModelError
from tests.unit import test_pt_safe_load as safe_load
from tests.unit.test_pt_safe_load import HOSTILE, torch_zip

IMGSZ = 64
DETECT_NAMES = {0: "vehicle", 1: "person"}
CLASSIFY_NAMES = {0: "sedan", 1: "truck", 2: "bus"}
BUS = cv2.imread(str(Path(ultralytics.__file__).parent / "assets" / "bus.jpg"))
markers = safe_load.markers  # the payloads' targets write a file if they ever run


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights, with BatchNorm statistics measured on random images: without them
    the activations of a freshly built YOLO fade to nothing and every output is the same."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average of the batches below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, IMGSZ, IMGSZ))
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """det.pt and cls.pt with random weights (class biases of the detector at 0, so that
    its scores spread over (0, 1)), the classifier trained 'at' 64 px as its record says."""
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pt")
    det = YOLO("yolov8n.yaml")
    det.model = DetectionModel("yolov8n.yaml", nc=len(DETECT_NAMES), verbose=False)
    det.model.names = DETECT_NAMES
    calibrated(det.model)
    for branch in det.model.model[-1].cv3:
        torch.nn.init.constant_(branch[-1].bias, 0.0)
    det.save(root / "det.pt")
    cls = YOLO("yolov8n-cls.yaml")
    cls.model = calibrated(
        ClassificationModel("yolov8n-cls.yaml", nc=len(CLASSIFY_NAMES), verbose=False)
    )
    cls.model.names = CLASSIFY_NAMES
    cls.ckpt = {"train_args": {"task": "classify", "imgsz": IMGSZ}}
    cls.save(root / "cls.pt")
    return {"det": root / "det.pt", "cls": root / "cls.pt"}


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Ultralytics export run (the real exporter, counted)."""
    runs: list[str] = []
    real = Exporter.__call__

    def counted(self: Exporter, model: Any = None) -> Any:
        runs.append(str(getattr(model, "task", "?")))
        return real(self, model)

    monkeypatch.setattr(Exporter, "__call__", counted)
    return runs


def options(cache: Path | None) -> EngineOptions:
    return EngineOptions(IMGSZ, gpu=False, onnx_cache_dir=cache)


def branch(path: Path, cache: Path | None) -> BranchModelSpec:
    return BranchModelSpec(id="body", kind="classifier", path=path, onnx_cache_dir=cache)


@pytest.fixture(scope="module")
def detector(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_engine(models["det"], options(tmp_path_factory.mktemp("cache")))


def test_a_pt_detector_reports_converting_while_exported_once_then_loads_from_the_cache(
    models: dict[str, Path], exports: list[str], tmp_path: Path
) -> None:
    """Given a .pt detector, when its slot loads it, then /health shows `converting`
    during the export; a second load (another replica, a restart) exports nothing."""
    slot: ModelSlot[Any] = ModelSlot("det")
    during: list[str] = []
    real = Exporter.__call__  # the counted one

    def watched(self: Exporter, model: Any = None) -> Any:
        during.append(slot.status()["state"])
        return real(self, model)

    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Exporter, "__call__", watched)
        slot.start(lambda converting: load_engine(models["det"], options(cache), converting))
        slot.join(120)
    assert during == ["converting"]
    status = slot.status()
    assert status["state"] == "enabled" and status["providers"] == [CPU]
    assert status["classes"] == DETECT_NAMES
    (onnx,) = cache.glob("*.onnx")
    assert onnx.name.endswith(f"-{IMGSZ}.onnx") and (cache / f"{onnx.stem}.json").is_file()
    stamp = onnx.stat().st_mtime_ns

    converting: list[bool] = []
    again = load_engine(models["det"], options(cache), lambda: converting.append(True))
    assert exports == ["detect"] and converting == [] and onnx.stat().st_mtime_ns == stamp
    assert again.names == DETECT_NAMES
    # Only the export and its record are left (and the lock): no temporary files.
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".lock", ".onnx"]


def test_two_replicas_loading_at_once_export_once(
    models: dict[str, Path], exports: list[str], tmp_path: Path
) -> None:
    engines: list[Any] = []
    threads = [
        threading.Thread(
            target=lambda: engines.append(load_engine(models["det"], options(tmp_path)))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(engines) == 2 and exports == ["detect"]


def ours(engine: Any, image: np.ndarray, params: DetectParams) -> np.ndarray:
    boxed, lb = letterbox(image, IMGSZ)
    rows = engine.detect(boxed[None], [params])[0]
    rows[:, :4] = unletterbox_boxes(rows[:, :4], lb)
    return np.asarray(rows)


@pytest.mark.parametrize("conf", [0.4, 0.6])
@pytest.mark.parametrize("name", ["bus", "noise"])
def test_the_exported_detector_matches_ultralytics_predict_on_the_pt(
    detector: Any, models: dict[str, Path], name: str, conf: float
) -> None:
    image = (
        BUS if name == "bus" else np.random.default_rng(1).integers(0, 255, (48, 80, 3), np.uint8)
    )
    got = ours(detector, image, DetectParams(conf=conf, iou=0.7))
    reference = YOLO(str(models["det"]))  # plain torch.load: the file is built by this test
    result = reference.predict(
        image, imgsz=IMGSZ, conf=conf, iou=0.7, rect=False, verbose=False, device="cpu"
    )[0]
    want = result.boxes.data.numpy()
    assert len(want) > 0, "the class biases should give some boxes above conf"
    assert len(got) == len(want)
    got, want = got[np.lexsort(got[:, :4].T)], want[np.lexsort(want[:, :4].T)]
    np.testing.assert_array_equal(got[:, 5], want[:, 5])
    np.testing.assert_allclose(got[:, :4], want[:, :4], atol=1.0)
    np.testing.assert_allclose(got[:, 4], want[:, 4], atol=1e-3)


def test_the_exported_detector_batches(detector: Any) -> None:
    """Exported with a dynamic batch: the Detector deployment stacks requests."""
    batch = np.random.default_rng(2).integers(0, 255, (3, IMGSZ, IMGSZ, 3), np.uint8)
    together = detector.infer(batch)
    assert together.shape[0] == 3
    for k in range(3):
        np.testing.assert_allclose(together[k], detector.infer(batch[k : k + 1])[0], atol=1e-4)


def test_a_pt_branch_classifier_gives_ultralytics_top1(
    models: dict[str, Path], exports: list[str], tmp_path: Path
) -> None:
    """Exported at the size it was trained at and served by the ONNX classifier code."""
    engine = BranchEngine(branch(models["cls"], tmp_path))
    assert (engine.imgsz, engine.names, engine.providers) == (IMGSZ, CLASSIFY_NAMES, [CPU])
    rng = np.random.default_rng(3)
    crops = [cv2.resize(BUS[100:700, 50:650], (IMGSZ, IMGSZ))] + [
        rng.integers(0, 255, (IMGSZ, IMGSZ, 3), np.uint8) for _ in range(3)
    ]
    labels = engine.classify(crops)
    results = YOLO(str(models["cls"])).predict(crops, verbose=False, device="cpu")
    for label, result in zip(labels, results, strict=True):
        assert label is not None
        assert label.label == CLASSIFY_NAMES[result.probs.top1]
        assert label.confidence == pytest.approx(float(result.probs.top1conf), abs=1e-4)
    BranchEngine(branch(models["cls"], tmp_path))  # another replica: from the cache
    assert exports == ["classify"]


def test_an_unreadable_record_is_a_miss_and_the_export_is_made_again(
    models: dict[str, Path], exports: list[str], tmp_path: Path
) -> None:
    first = export_onnx(models["cls"], "classify", tmp_path)
    assert not first.cached and first.path.name == f"{first.record.source_sha256}.onnx"
    first.path.with_suffix(".json").write_text("{not json")
    again = export_onnx(models["cls"], "classify", tmp_path)
    assert not again.cached and again.record == first.record
    assert export_onnx(models["cls"], "classify", tmp_path).cached
    assert exports == ["classify", "classify"]


@pytest.mark.parametrize("use", ["detector", "branch"])
def test_a_model_used_for_another_task_is_a_clear_error_and_is_not_cached(
    models: dict[str, Path], exports: list[str], tmp_path: Path, use: str
) -> None:
    pt, want, found = (
        (models["cls"], "a detector needs a detect model", "classify")
        if use == "detector"
        else (models["det"], "a branch classifier needs a classify model", "detect")
    )
    with pytest.raises(ModelLoadError, match=f"is a {found} model; {want}"):
        load(use, pt, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and exports == []


def test_a_cached_export_used_for_another_task_is_refused_from_its_record(
    detector: Any, models: dict[str, Path], exports: list[str], tmp_path: Path
) -> None:
    export_onnx(models["cls"], "classify", tmp_path)
    with pytest.raises(ModelLoadError, match="is a classify model; a detector needs"):
        export_onnx(models["cls"], "detect", tmp_path)
    assert exports == ["classify"]


def load(use: str, pt: Path, cache: Path, converting: Any = None) -> Any:
    if use == "detector":
        return load_engine(pt, options(cache), converting)
    return BranchEngine(branch(pt, cache), converting)


@pytest.mark.parametrize("use", ["detector", "branch"])
@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_pt_is_refused_before_any_export_and_nothing_is_cached(
    tmp_path: Path,
    markers: Path,
    exports: list[str],
    case: str,
    use: str,
) -> None:
    pickles, reason = HOSTILE[case]
    pt = torch_zip(tmp_path / f"{case}.pt", *pickles)
    converting: list[bool] = []
    with pytest.raises(UnsafeModelError, match=reason):
        load(use, pt, tmp_path / "cache", lambda: converting.append(True))
    assert exports == [] and converting == [] and not (tmp_path / "cache").exists()


@pytest.fixture
def hooked(models: dict[str, Path], tmp_path: Path) -> Iterator[Path]:
    """det.pt with a forward pre-hook that would call a class: passes the byte scan,
    refused once loaded (`module_problems`)."""
    from ultralytics.nn.tasks import DetectionModel

    ckpt = torch.load(models["det"], weights_only=False)  # built by this module: trusted
    ckpt["model"].model[0].register_forward_pre_hook(DetectionModel)
    torch.save(ckpt, tmp_path / "hooked.pt")
    yield tmp_path / "hooked.pt"


@pytest.mark.parametrize("use", ["detector", "branch"])
def test_a_model_refused_once_loaded_leaves_nothing_in_the_cache(
    hooked: Path, exports: list[str], tmp_path: Path, use: str
) -> None:
    with pytest.raises(UnsafeModelError, match="_forward_pre_hooks is not empty"):
        load(use, hooked, tmp_path / "cache")
    assert exports == [] and not (tmp_path / "cache").exists()


def test_without_a_cache_directory_the_export_is_temporary(
    models: dict[str, Path], exports: list[str]
) -> None:
    engine = BranchEngine(branch(models["cls"], None))
    assert engine.names == CLASSIFY_NAMES and exports == ["classify"]
