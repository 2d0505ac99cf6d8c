"""Branch engines on the committed demo classifier and RapidOCR's pretrained models."""

import numpy as np
import pytest
from ultralytics import YOLO

from demo.datasets import EVAL_SEED_START
from demo.scenes import Scene
from deployments.inference.classify import ClassifierEngine, PlateReader, normalise_plate
from graph.common.errors import InferenceError, ModelLoadError
from graph.common.vision import crop_square
from graph.config import PROJECT_ROOT

CLASSIFIER = PROJECT_ROOT / "models" / "body-type.onnx"


def vehicles(seed: int) -> tuple[np.ndarray, list]:
    image, truths, _ = Scene(seed, n_frames=1).render(0)
    return image, [
        t for t in truths if t.cls == "vehicle" and not t.truncated and t.visible_fraction > 0.8
    ]


def test_classifier_names_body_types_and_agrees_with_ultralytics() -> None:
    engine = ClassifierEngine(CLASSIFIER)
    assert engine.imgsz == 128
    assert set(engine.names.values()) == {"bus", "hatchback", "sedan", "truck", "van"}
    image, objs = vehicles(EVAL_SEED_START + 901)
    crops = np.stack([crop_square(image, t.box, 128) for t in objs])
    ours = engine.classify(crops)
    assert [o.label for o in ours] == [t.body_type for t in objs]
    reference = YOLO(str(CLASSIFIER), task="classify").predict(
        list(crops), imgsz=128, verbose=False, device="cpu"
    )
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.label == theirs.names[int(theirs.probs.top1)]
        assert mine.confidence == pytest.approx(float(theirs.probs.top1conf), abs=1e-3)


def test_classifier_rejects_wrong_crop_size_and_missing_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceError, match="128"):
        ClassifierEngine(CLASSIFIER).classify(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ModelLoadError):
        ClassifierEngine(tmp_path / "none.onnx")


def test_plate_reader_reads_plates_from_vehicle_crops() -> None:
    reader = PlateReader()
    image, objs = vehicles(EVAL_SEED_START + 902)
    big = [t for t in objs if t.plate_box and t.plate_box[3] - t.plate_box[1] >= 30]
    assert big, "the scene has a near-lane vehicle"
    for t in big:
        x1, y1, x2, y2 = t.box
        read = reader.read(image[y1:y2, x1:x2])
        assert read is not None and read.label == t.plate and read.confidence > 0.5
    assert reader.read(np.full((80, 200, 3), 127, np.uint8)) is None


def test_plate_reader_reads_small_plates_at_their_own_size() -> None:
    """Plates 18-29 px high, the far lanes: the text detector upscales a crop only to
    160 px on its shortest side, and these are still read exactly (read at the crops'
    own size, without that floor, one of them is misread)."""
    cases = []
    for seed, frame in (
        (900, 150),
        (901, 150),
        (903, 150),
        (905, 150),
        (907, 150),
        (909, 240),
        (911, 240),
    ):
        image, truths, labels = Scene(EVAL_SEED_START + seed, n_frames=300).render(frame)
        for t in truths:
            pb = t.plate_box
            if t.cls != "vehicle" or t.truncated or pb is None or not 18 <= pb[3] - pb[1] < 30:
                continue
            if (labels[pb[1] : pb[3], pb[0] : pb[2]] == t.object_id).all():
                x1, y1, x2, y2 = t.box
                cases.append((image[y1:y2, x1:x2], t.plate))
    assert len(cases) >= 12
    reader = PlateReader()
    reads = [reader.read(crop) for crop, _ in cases]
    assert [r.label if r else None for r in reads] == [plate for _, plate in cases]


def test_plate_text_is_normalised() -> None:
    assert normalise_plate(" ab-12 3cd ") == "AB123CD"
