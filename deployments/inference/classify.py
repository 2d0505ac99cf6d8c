"""Branch engines (no Ray): a YOLO classification model in ONNX Runtime (a `.pt` one
exported to ONNX once: `pt_models`), and a licence plate reader on RapidOCR's pretrained
PP-OCR models (shipped inside its wheel)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deployments.inference.engines import make_session, parse_names
from deployments.inference.gpu import choose_providers
from deployments.inference.pt_models import pt_as_onnx
from graph.common.errors import InferenceError, ModelLoadError
from graph.common.schemas import BranchModelSpec
from graph.common.vision import crop_square, to_model_input

PLATE_PATTERN = re.compile(r"^[A-Z0-9]{4,10}$")


@dataclass(frozen=True)
class Label:
    label: str
    confidence: float


class ClassifierEngine:
    """YOLO-cls ONNX model: square BGR crops (see vision.crop_square) in, top-1 out."""

    def __init__(self, path: Path, intra_op_threads: int = 1, gpu: bool = False) -> None:
        """`gpu`: CUDA when Ray assigned the replica a GPU; never by the device's mere
        presence (a replica without a share must not run on GPU 0 outside Ray's
        accounting)."""
        import onnxruntime as ort

        providers = choose_providers(ort.get_available_providers(), gpu, None)
        self._session = make_session(path, intra_op_threads, providers)
        (inp,) = self._session.get_inputs()
        self._input = inp.name
        meta = self._session.get_modelmeta().custom_metadata_map
        size = inp.shape[2] if isinstance(inp.shape[2], int) else meta.get("imgsz", "[224]")
        self.imgsz = (
            int(size) if isinstance(size, int) else int(str(size).strip("[]").split(",")[0])
        )
        nc = self._session.get_outputs()[0].shape[1]
        self.names = parse_names(meta.get("names"), nc if isinstance(nc, int) else 0)
        self.providers = self._session.get_providers()

    def classify(self, crops: np.ndarray) -> list[Label]:
        """BxSxSx3 uint8 crops at `imgsz` → the best label of each."""
        if crops.ndim != 4 or crops.shape[1:3] != (self.imgsz, self.imgsz):
            raise InferenceError(f"expected Bx{self.imgsz}x{self.imgsz}x3 crops, got {crops.shape}")
        probs = self._session.run(None, {self._input: to_model_input(crops)})[0]
        best = probs.argmax(1)
        return [
            Label(self.names.get(int(k), str(int(k))), float(probs[i, k]))
            for i, k in enumerate(best)
        ]


def load_classifier(
    spec: BranchModelSpec, on_converting: Callable[[], None] | None = None, gpu: bool = False
) -> ClassifierEngine:
    """A branch's `.onnx` classifier, or its `.pt` one exported to ONNX (at the size it
    was trained at; `on_converting` while that runs), served the same way."""
    assert spec.path is not None
    if spec.path.suffix == ".onnx":
        return ClassifierEngine(spec.path, spec.intra_op_threads, gpu)
    if spec.path.suffix != ".pt":
        raise ModelLoadError(f"branch {spec.id}: classifiers are .onnx or .pt files")
    with pt_as_onnx(spec.path, "classify", spec.onnx_cache_dir, None, on_converting) as (
        onnx_path,
        names,
    ):
        engine = ClassifierEngine(onnx_path, spec.intra_op_threads, gpu)
    if engine.names != names:
        raise ModelLoadError(f"{spec.path.name}: its ONNX export names other classes than it")
    return engine


def normalise_plate(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


class PlateReader:
    """Finds and reads the most plate-like text line in a vehicle crop."""

    def __init__(self) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise ModelLoadError("rapidocr-onnxruntime is not installed (make install)") from exc
        # Measured on held-out vehicle crops (2026-12-03 and 12-05, this 2-core box).
        # RapidOCR's defaults (text detection at a shortest side of 736 px, ONNX
        # Runtime's spinning thread pool on every core) cost 1,222 CPU-ms a crop. One
        # thread and a 320 px side read the same plates at 86-113 CPU-ms. On 310 crops of
        # ten scenes (plates 18-60 px high), a 160 px side without the angle classifier
        # read 113/114 plates of 30 px or more and 171/196 of 18-29 px, against 112 and
        # 169 at 320 px with it, for 45 and 35 CPU-ms a crop instead of 86 and 89.
        # - A crop's shortest side is raised to 160 px at least: upscaling a
        #   180 px vehicle to 320 px adds no detail, only pixels for the detector.
        # - The angle classifier only tells 0° from 180° text, which a road camera
        #   does not see.
        self._ocr: Any = RapidOCR(
            intra_op_num_threads=1,
            inter_op_num_threads=1,
            det_limit_side_len=160,
            use_cls=False,
        )
        self.providers = ["CPUExecutionProvider"]  # RapidOCR's own ONNX Runtime sessions
        self.imgsz = 0  # any crop size
        self.names: dict[int, str] = {}

    def read(self, crop: np.ndarray) -> Label | None:
        """The plate text and its recognition confidence, or None if no plate-like text."""
        result, _ = self._ocr(crop)
        candidates: list[Label] = []
        for _box, text, score in result or []:
            plate = normalise_plate(str(text))
            if PLATE_PATTERN.match(plate):
                candidates.append(Label(plate, float(score)))
        return max(candidates, key=lambda c: (len(c.label) >= 6, c.confidence), default=None)


class BranchEngine:
    """What a Classifier replica runs: crops of any size in (already padded by the
    camera), one Label or None (nothing readable) out per crop."""

    def __init__(
        self,
        spec: BranchModelSpec,
        on_converting: Callable[[], None] | None = None,
        gpu: bool = False,
    ) -> None:
        self.kind = spec.kind
        if spec.kind == "ocr":
            self._plates: PlateReader | None = PlateReader()
            self._classifier: ClassifierEngine | None = None
            inner: Any = self._plates
        else:
            if spec.path is None:
                raise ModelLoadError(f"branch {spec.id}: a classifier needs a model file")
            self._plates = None
            self._classifier = load_classifier(spec, on_converting, gpu)
            inner = self._classifier
        self.providers, self.imgsz, self.names = inner.providers, inner.imgsz, inner.names

    def classify(self, crops: list[np.ndarray]) -> list[Label | None]:
        for crop in crops:
            if crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] < 2 or crop.shape[1] < 2:
                raise InferenceError(f"expected HxWx3 BGR crops, got {crop.shape}")
        if self._plates is not None:
            return [self._plates.read(c) for c in crops]
        assert self._classifier is not None
        size = self._classifier.imgsz
        batch = np.stack([crop_square(c, (0, 0, c.shape[1], c.shape[0]), size, 0.0) for c in crops])
        return list(self._classifier.classify(batch))
